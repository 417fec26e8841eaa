package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"

	"github.com/sluicemesh/sluice/cni/cniapi"
)

// maxAnswer bounds how much of the agent's answer is read; a real one is a few bytes.
const maxAnswer = 64 << 10

// agentClient speaks the cniapi protocol to the node agent over its unix socket.
type agentClient struct {
	socket string
	http   *http.Client
}

func newAgentClient(socket string) *agentClient {
	return &agentClient{
		socket: socket,
		http: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
			// The plugin makes one request and exits; pooling would only leave a
			// half-closed connection for the agent to clean up.
			DisableKeepAlives: true,
		}},
	}
}

// unreachableError means the agent gave no answer at all: no socket, nobody listening,
// or no reply within the timeout. Only this error lets ADD fall back to the state file;
// an agent that answers "no" is obeyed.
type unreachableError struct {
	socket string
	err    error
}

func (e *unreachableError) Error() string {
	return fmt.Sprintf("node agent at %s is unreachable: %v", e.socket, e.err)
}

func (e *unreachableError) Unwrap() error { return e.err }

// refusedError is a non-200 answer from the agent, carrying its message.
type refusedError struct {
	status int
	msg    string
}

func (e *refusedError) Error() string {
	return fmt.Sprintf("node agent answered %d %s: %s", e.status, http.StatusText(e.status), e.msg)
}

// call POSTs req to path and decodes the answer.
func (c *agentClient) call(ctx context.Context, path string, req cniapi.Request) (cniapi.Response, error) {
	var resp cniapi.Response
	body, err := json.Marshal(req)
	if err != nil {
		return resp, fmt.Errorf("encode request: %w", err)
	}
	// The host part is ignored by the unix dialer; it only has to be a valid URL.
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://sluice-agent"+path, bytes.NewReader(body))
	if err != nil {
		return resp, fmt.Errorf("build request: %w", err)
	}
	hreq.Header.Set("Content-Type", "application/json")

	hresp, err := c.http.Do(hreq)
	if err != nil {
		return resp, &unreachableError{socket: c.socket, err: err}
	}
	defer hresp.Body.Close()
	answer, err := io.ReadAll(io.LimitReader(hresp.Body, maxAnswer))
	if err != nil {
		// The agent went away mid-answer; for ADD that is no better than no answer.
		return resp, &unreachableError{socket: c.socket, err: fmt.Errorf("read answer: %w", err)}
	}

	if hresp.StatusCode != http.StatusOK {
		msg := strings.TrimSpace(string(answer))
		var r cniapi.Response
		if json.Unmarshal(answer, &r) == nil && r.Error != "" {
			msg = r.Error
		}
		if msg == "" {
			msg = "no message"
		}
		return resp, &refusedError{status: hresp.StatusCode, msg: msg}
	}
	if err := json.Unmarshal(answer, &resp); err != nil {
		return resp, fmt.Errorf("node agent at %s sent an unreadable answer %q: %w", c.socket, answer, err)
	}
	return resp, nil
}
