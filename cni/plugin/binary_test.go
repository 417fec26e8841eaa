package plugin

import (
	"bytes"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// buildPlugin compiles cmd/sluice-cni, so the tests below exercise what the runtime runs:
// skel's env parsing, stdout and exit code included.
func buildPlugin(t *testing.T) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("go tool not in PATH, cannot build the plugin binary: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "sluice-cni")
	cmd := exec.Command(goTool, "build", "-o", bin, "github.com/sluicemesh/sluice/cni/cmd/sluice-cni")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// runPlugin execs bin the way a runtime does and returns stdout and the exit code.
func runPlugin(t *testing.T, bin, command string, stdin []byte, cniArgs string) ([]byte, int) {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = []string{
		"CNI_COMMAND=" + command,
		"CNI_CONTAINERID=c0ffee",
		// A path that is not a netns: skel only checks it is not the plugin's own.
		"CNI_NETNS=" + filepath.Join(t.TempDir(), "netns"),
		"CNI_IFNAME=eth0",
		"CNI_ARGS=" + cniArgs,
		"CNI_PATH=/opt/cni/bin",
	}
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	t.Logf("%s stderr:\n%s", command, stderr.Bytes())
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return stdout.Bytes(), 0
	case errors.As(err, &exitErr):
		return stdout.Bytes(), exitErr.ExitCode()
	default:
		t.Fatalf("run %s: %v", bin, err)
		return nil, -1
	}
}

func TestBinary(t *testing.T) {
	bin := buildPlugin(t)

	t.Run("VERSION", func(t *testing.T) {
		out, code := runPlugin(t, bin, "VERSION", nil, "")
		if code != 0 || !strings.Contains(string(out), `"1.0.0"`) {
			t.Errorf("VERSION exit %d, stdout %s", code, out)
		}
	})

	t.Run("ADD passes prevResult through", func(t *testing.T) {
		e := newEnv(t, agentUp, "")
		out, code := runPlugin(t, bin, "ADD", e.conf(t, nil), podArgs("prod", "web"))
		if code != 0 {
			t.Fatalf("exit %d, stdout %s", code, out)
		}
		assertSameJSON(t, out, []byte(prevResult))
		if n := len(e.agent.got()); n != 1 {
			t.Errorf("agent got %d requests, want 1", n)
		}
	})

	t.Run("DEL with agent down", func(t *testing.T) {
		e := newEnv(t, agentDown, "")
		out, code := runPlugin(t, bin, "DEL", e.conf(t, nil), podArgs("prod", "web"))
		if code != 0 || len(bytes.TrimSpace(out)) != 0 {
			t.Errorf("exit %d, stdout %q; want 0 and nothing", code, out)
		}
	})

	errCases := []struct {
		name     string
		stdin    func(e *testEnv) []byte
		mode     string
		state    string
		wantCode uint
		wantMsg  string
	}{
		{name: "ADD without prevResult", mode: agentUp,
			stdin:    func(e *testEnv) []byte { return e.conf(t, map[string]any{"prevResult": nil}) },
			wantCode: types.ErrInvalidNetworkConfig, wantMsg: "prevResult"},
		{name: "ADD with agent down in ambient namespace", mode: agentDown, state: stateAmbient,
			stdin:    func(e *testEnv) []byte { return e.conf(t, nil) },
			wantCode: types.ErrTryAgainLater, wantMsg: "cannot start uncaptured"},
		{name: "ADD with malformed stdin", mode: agentUp,
			stdin:    func(*testEnv) []byte { return []byte("{nope") },
			wantCode: types.ErrDecodingFailure, wantMsg: "unmarshal"},
		{name: "ADD with bad timeout", mode: agentUp,
			stdin:    func(e *testEnv) []byte { return e.conf(t, map[string]any{"timeout": "later"}) },
			wantCode: types.ErrInvalidNetworkConfig, wantMsg: "timeout"},
	}
	for _, tc := range errCases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, tc.mode, tc.state)
			out, code := runPlugin(t, bin, "ADD", tc.stdin(e), podArgs("prod", "web"))
			if code == 0 {
				t.Fatalf("exit 0, want failure; stdout %s", out)
			}
			var got types.Error
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("stdout is not a CNI error: %v\n%s", err, out)
			}
			if got.Code != tc.wantCode || !strings.Contains(got.Msg, tc.wantMsg) {
				t.Errorf("error %+v, want code %d and msg mentioning %q", got, tc.wantCode, tc.wantMsg)
			}
		})
	}
}

func assertSameJSON(t *testing.T, got, want []byte) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, got)
	}
	if err := json.Unmarshal(want, &w); err != nil {
		t.Fatal(err)
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	if !bytes.Equal(gb, wb) {
		t.Errorf("output\n%s\nwant\n%s", gb, wb)
	}
}
