package hbone

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

func TestDetachedStreamOutlivesHandler(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	returned := make(chan struct{})
	srv := &Server{Handler: func(ctx context.Context, req *Request, s *Stream) {
		if err := s.Respond(200); err != nil {
			t.Error(err)
			return
		}
		end := s.Detach()
		go func() {
			defer end()
			<-returned // the handler is gone before any data moves
			io.Copy(s, s)
			s.CloseWrite()
		}()
		close(returned)
	}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- srv.ServeConn(ctx, sn) }()
	cc, err := NewClientConn(cn, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	s, err := cc.Connect(ctx, Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	<-returned
	if _, err := s.Write([]byte("after the handler returned")); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	s.SetReadDeadline(time.Now().Add(3 * time.Second))
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "after the handler returned" {
		t.Fatalf("echo %q, %v", got, err)
	}
	cc.Close()
	select {
	case <-served:
	case <-time.After(3 * time.Second):
		t.Fatal("ServeConn did not return after the detached stream ended")
	}
}
