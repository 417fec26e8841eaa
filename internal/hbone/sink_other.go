//go:build !unix

package hbone

import "errors"

// Outside Unix there are no raw socket writes: SendTo refuses, callers read instead.
const sinkSupported = false

func (k *sink) writeNow([]byte) (int, error) { return 0, errors.ErrUnsupported }
func (k *sink) writeAll([]byte) (int, error) { return 0, errors.ErrUnsupported }
