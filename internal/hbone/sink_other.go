//go:build !unix

package hbone

import (
	"errors"
	"syscall"
)

// Outside Unix there are no raw socket writes: SendTo refuses, callers read instead.
const sinkSupported = false

type sinkWriter struct{}

func newSinkWriter(syscall.RawConn) *sinkWriter { return &sinkWriter{} }

func (*sinkWriter) WriteNow([]byte) (int, error) { return 0, errors.ErrUnsupported }
func (*sinkWriter) Write([]byte) (int, error)    { return 0, errors.ErrUnsupported }
