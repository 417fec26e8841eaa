//go:build unix

package hbone

import (
	"syscall"

	"github.com/sluicemesh/sluice/internal/rawio"
)

const sinkSupported = true

// sinkWriter writes to the destination with raw system calls (see package rawio):
// WriteNow takes what the socket takes at once, Write waits for room.
type sinkWriter = rawio.Writer

func newSinkWriter(rc syscall.RawConn) *sinkWriter { return rawio.NewWriter(rc) }
