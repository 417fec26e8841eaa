package plugin

import (
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"testing"

	"github.com/sluicemesh/sluice/cni/cniapi"
)

// fakeAgent is a node agent served on a unix socket in the test's temp dir. By default it
// behaves like the real one: ADD enrolls, CHECK and DEL of an unknown container answer 404.
type fakeAgent struct {
	socket string

	// respond, if set, replaces the default behaviour.
	respond func(w http.ResponseWriter, r *http.Request, req cniapi.Request)

	mu       sync.Mutex
	calls    []agentCall
	enrolled map[string]bool
}

type agentCall struct {
	path string
	req  cniapi.Request
}

func startAgent(t *testing.T) *fakeAgent {
	t.Helper()
	a := &fakeAgent{
		socket:   filepath.Join(t.TempDir(), "cni.sock"),
		enrolled: map[string]bool{},
	}
	ln, err := net.Listen("unix", a.socket)
	if err != nil {
		t.Fatalf("listen on %s: %v", a.socket, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(a.serve)}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("fake agent: %v", err)
		}
	}()
	t.Cleanup(func() { srv.Close() })
	return a
}

func (a *fakeAgent) serve(w http.ResponseWriter, r *http.Request) {
	var req cniapi.Request
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeAnswer(w, http.StatusBadRequest, cniapi.Response{Error: "bad request: " + err.Error()})
		return
	}
	a.mu.Lock()
	a.calls = append(a.calls, agentCall{path: r.URL.Path, req: req})
	a.mu.Unlock()
	if a.respond != nil {
		a.respond(w, r, req)
		return
	}

	a.mu.Lock()
	defer a.mu.Unlock()
	switch r.URL.Path {
	case cniapi.PathAdd:
		a.enrolled[req.ContainerID] = true
		writeAnswer(w, http.StatusOK, cniapi.Response{Enrolled: true})
	case cniapi.PathCheck, cniapi.PathDel:
		if !a.enrolled[req.ContainerID] {
			writeAnswer(w, http.StatusNotFound, cniapi.Response{Error: "unknown container " + req.ContainerID})
			return
		}
		if r.URL.Path == cniapi.PathDel {
			delete(a.enrolled, req.ContainerID)
		}
		writeAnswer(w, http.StatusOK, cniapi.Response{Enrolled: true})
	default:
		writeAnswer(w, http.StatusNotFound, cniapi.Response{Error: "no such path"})
	}
}

func writeAnswer(w http.ResponseWriter, status int, resp cniapi.Response) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(resp)
}

// got returns the calls the agent received so far.
func (a *fakeAgent) got() []agentCall {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]agentCall(nil), a.calls...)
}

// refuse makes every answer status with message msg.
func refuse(status int, msg string) func(http.ResponseWriter, *http.Request, cniapi.Request) {
	return func(w http.ResponseWriter, _ *http.Request, _ cniapi.Request) {
		writeAnswer(w, status, cniapi.Response{Error: msg})
	}
}

// hang never answers until the plugin gives up.
func hang(_ http.ResponseWriter, r *http.Request, _ cniapi.Request) {
	<-r.Context().Done()
}

// garble answers 200 with a body that is not JSON.
func garble(w http.ResponseWriter, _ *http.Request, _ cniapi.Request) {
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write([]byte("<html>proxy error</html>"))
}
