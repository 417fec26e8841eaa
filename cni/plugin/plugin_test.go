package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/sluicemesh/sluice/cni/cniapi"
)

// prevResult is what a primary plugin hands on. "x-vendor" is a field the CNI library
// does not know; ADD must pass it through all the same.
const prevResult = `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"0a:58:0a:01:00:05","sandbox":"/var/run/netns/cni-1234"}],"ips":[{"address":"10.1.0.5/24","gateway":"10.1.0.1","interface":0},{"address":"fd00::5/64","interface":0}],"routes":[{"dst":"0.0.0.0/0"}],"x-vendor":{"kept":true}}`

const prevResult040 = `{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/cni-1234"}],"ips":[{"version":"4","address":"10.2.0.7/16","interface":0}]}`

// Agent states a test can ask for.
const (
	agentUp    = "up"
	agentDown  = "down"  // no socket file at all
	agentStale = "stale" // socket file left behind, nobody listening
)

// testEnv is one plugin run's surroundings: the agent (or its absence) and the state file.
type testEnv struct {
	agent     *fakeAgent
	socket    string
	stateFile string
}

func newEnv(t *testing.T, mode, state string) *testEnv {
	t.Helper()
	dir := t.TempDir()
	e := &testEnv{stateFile: filepath.Join(dir, "mesh-state.json")}
	switch mode {
	case agentUp:
		e.agent = startAgent(t)
		e.socket = e.agent.socket
	case agentDown:
		e.socket = filepath.Join(dir, "cni.sock")
	case agentStale:
		e.socket = filepath.Join(dir, "cni.sock")
		ln, err := net.Listen("unix", e.socket)
		if err != nil {
			t.Fatal(err)
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
	default:
		t.Fatalf("unknown agent mode %q", mode)
	}
	if state != "" {
		if err := os.WriteFile(e.stateFile, []byte(state), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

// conf builds the plugin's stdin: a valid chained config pointing at e, with overrides
// applied; an override of nil deletes the key.
func (e *testEnv) conf(t *testing.T, overrides map[string]any) []byte {
	t.Helper()
	c := map[string]any{
		"cniVersion":  "1.0.0",
		"name":        "k8s-pod-network",
		"type":        "sluice-cni",
		"agentSocket": e.socket,
		"stateFile":   e.stateFile,
		"prevResult":  json.RawMessage(prevResult),
	}
	for k, v := range overrides {
		if v == nil {
			delete(c, k)
			continue
		}
		c[k] = v
	}
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func podArgs(ns, name string) string {
	return "IgnoreUnknown=1;K8S_POD_NAMESPACE=" + ns + ";K8S_POD_NAME=" + name +
		";K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=uid-" + name
}

func cmdArgs(stdin []byte, cniArgs string) *skel.CmdArgs {
	return &skel.CmdArgs{
		ContainerID: "c0ffee",
		Netns:       "/var/run/netns/cni-1234",
		IfName:      "eth0",
		Args:        cniArgs,
		Path:        "/opt/cni/bin",
		StdinData:   stdin,
	}
}

func testPlugin(t *testing.T) *Plugin {
	return &Plugin{Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))}
}

const (
	stateAmbient    = `{"ambientNamespaces":["prod","shop"]}`
	stateNotAmbient = `{"ambientNamespaces":["shop"]}`
)

// checkErr asserts err is nil when wantCode is 0, else a *types.Error with that code
// whose message contains every string in wantMsg.
func checkErr(t *testing.T, err error, wantCode uint, wantMsg []string) {
	t.Helper()
	if wantCode == 0 {
		if err != nil {
			t.Fatalf("want success, got %v", err)
		}
		return
	}
	var cniErr *types.Error
	if !errors.As(err, &cniErr) {
		t.Fatalf("want CNI error code %d, got %T %v", wantCode, err, err)
	}
	if cniErr.Code != wantCode {
		t.Errorf("code = %d, want %d (%v)", cniErr.Code, wantCode, cniErr)
	}
	for _, m := range wantMsg {
		if !strings.Contains(cniErr.Msg, m) {
			t.Errorf("msg %q does not mention %q", cniErr.Msg, m)
		}
	}
}

func TestAdd(t *testing.T) {
	tests := []struct {
		name      string
		mode      string
		respond   func(http.ResponseWriter, *http.Request, cniapi.Request)
		state     string
		conf      map[string]any
		stdin     string // replaces the generated config when set
		args      string // CNI_ARGS; default a pod in namespace prod
		wantCode  uint
		wantMsg   []string
		wantCalls int
		wantIPs   []string
	}{
		{name: "agent enrolls pod", mode: agentUp, wantCalls: 1, wantIPs: []string{"10.1.0.5", "fd00::5"}},
		{name: "0.4.0 prevResult", mode: agentUp, conf: map[string]any{"cniVersion": "0.4.0", "prevResult": json.RawMessage(prevResult040)},
			wantCalls: 1, wantIPs: []string{"10.2.0.7"}},
		{name: "unknown config fields ignored", mode: agentUp, wantCalls: 1,
			conf: map[string]any{"sluiceConvertedFrom": "10-flannel.conf", "runtimeConfig": map[string]any{"portMappings": []any{}}, "capabilities": map[string]bool{"portMappings": true}}},
		{name: "excluded namespace skips agent", mode: agentUp, args: podArgs("kube-system", "coredns")},
		{name: "custom exclude list replaces default", mode: agentUp, conf: map[string]any{"excludeNamespaces": []string{"infra"}},
			args: podArgs("infra", "vault")},
		{name: "kube-system asked when not excluded", mode: agentUp, conf: map[string]any{"excludeNamespaces": []string{}},
			args: podArgs("kube-system", "coredns"), wantCalls: 1, wantIPs: []string{"10.1.0.5", "fd00::5"}},
		{name: "no pod args skips agent", mode: agentUp, args: "IgnoreUnknown=1"},
		{name: "agent refuses", mode: agentUp, respond: refuse(http.StatusInternalServerError, "enroll: netns gone"),
			wantCode: types.ErrInternal, wantMsg: []string{"refused ADD", "prod/web", "enroll: netns gone"}, wantCalls: 1},
		{name: "agent busy", mode: agentUp, respond: refuse(http.StatusServiceUnavailable, "starting up"),
			wantCode: types.ErrTryAgainLater, wantMsg: []string{"starting up"}, wantCalls: 1},
		{name: "agent answers garbage", mode: agentUp, respond: garble, wantCode: types.ErrInternal, wantMsg: []string{"unreadable answer"}, wantCalls: 1},
		{name: "agent hangs, namespace not ambient", mode: agentUp, respond: hang, state: stateNotAmbient,
			conf: map[string]any{"timeout": "100ms"}, wantCalls: 1},
		{name: "agent hangs, namespace ambient", mode: agentUp, respond: hang, state: stateAmbient,
			conf: map[string]any{"timeout": "100ms"}, wantCode: types.ErrTryAgainLater, wantMsg: []string{"unreachable"}, wantCalls: 1},
		{name: "agent down, namespace ambient", mode: agentDown, state: stateAmbient,
			wantCode: types.ErrTryAgainLater, wantMsg: []string{"node agent at ", "cni.sock is unreachable", "prod/web cannot start uncaptured", "ambient"}},
		{name: "agent down, namespace not ambient", mode: agentDown, state: stateNotAmbient},
		{name: "agent down, state file missing", mode: agentDown,
			wantCode: types.ErrTryAgainLater, wantMsg: []string{"unreachable", "mesh-state.json cannot be read", "cannot start uncaptured"}},
		{name: "agent down, state file corrupt", mode: agentDown, state: "{not json",
			wantCode: types.ErrTryAgainLater, wantMsg: []string{"cannot start uncaptured"}},
		{name: "stale socket, namespace ambient", mode: agentStale, state: stateAmbient,
			wantCode: types.ErrTryAgainLater, wantMsg: []string{"unreachable"}},
		{name: "stale socket, namespace not ambient", mode: agentStale, state: stateNotAmbient},
		{name: "missing prevResult", mode: agentUp, conf: map[string]any{"prevResult": nil},
			wantCode: types.ErrInvalidNetworkConfig, wantMsg: []string{`"prevResult" is missing`, "chained"}},
		{name: "null prevResult", mode: agentUp, conf: map[string]any{"prevResult": json.RawMessage("null")},
			wantCode: types.ErrInvalidNetworkConfig, wantMsg: []string{"prevResult"}},
		{name: "prevResult not a result", mode: agentUp, conf: map[string]any{"prevResult": json.RawMessage(`{"ips":"ten"}`)},
			wantCode: types.ErrDecodingFailure, wantMsg: []string{"prevResult"}},
		{name: "bad JSON", mode: agentUp, stdin: `{"cniVersion":"1.0.0",`, wantCode: types.ErrDecodingFailure, wantMsg: []string{"not valid JSON"}},
		{name: "JSON array", mode: agentUp, stdin: `[1,2]`, wantCode: types.ErrDecodingFailure, wantMsg: []string{"JSON object"}},
		{name: "empty stdin", mode: agentUp, stdin: " \n", wantCode: types.ErrDecodingFailure, wantMsg: []string{"empty"}},
		{name: "unsupported cniVersion", mode: agentUp, conf: map[string]any{"cniVersion": "0.2.0"},
			wantCode: types.ErrIncompatibleCNIVersion, wantMsg: []string{"cniVersion", "0.2.0", "1.0.0"}},
		{name: "missing cniVersion", mode: agentUp, conf: map[string]any{"cniVersion": nil},
			wantCode: types.ErrInvalidNetworkConfig, wantMsg: []string{"cniVersion"}},
		{name: "bad timeout", mode: agentUp, conf: map[string]any{"timeout": "soon"},
			wantCode: types.ErrInvalidNetworkConfig, wantMsg: []string{`"timeout"`, "soon"}},
		{name: "timeout of wrong type", mode: agentUp, conf: map[string]any{"timeout": 5},
			wantCode: types.ErrInvalidNetworkConfig, wantMsg: []string{`"timeout"`, "number", "string"}},
		{name: "excludeNamespaces of wrong type", mode: agentUp, conf: map[string]any{"excludeNamespaces": "kube-system"},
			wantCode: types.ErrInvalidNetworkConfig, wantMsg: []string{`"excludeNamespaces"`, "list"}},
		{name: "bad CNI_ARGS", mode: agentUp, args: "K8S_POD_NAME", wantCode: types.ErrInvalidEnvironmentVariables, wantMsg: []string{"CNI_ARGS"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, tt.mode, tt.state)
			if tt.respond != nil {
				e.agent.respond = tt.respond
			}
			stdin := e.conf(t, tt.conf)
			if tt.stdin != "" {
				stdin = []byte(tt.stdin)
			}
			args := tt.args
			if args == "" {
				args = podArgs("prod", "web")
			}

			out, err := testPlugin(t).Add(context.Background(), cmdArgs(stdin, args))
			checkErr(t, err, tt.wantCode, tt.wantMsg)
			if tt.wantCode == 0 {
				// prevResult exactly as given, unknown fields and all.
				var want bytes.Buffer
				_ = json.Compact(&want, []byte(prevResult))
				if tt.conf["prevResult"] != nil {
					want.Reset()
					_ = json.Compact(&want, tt.conf["prevResult"].(json.RawMessage))
				}
				if !bytes.Equal(out, want.Bytes()) {
					t.Errorf("ADD printed\n%s\nwant prevResult unchanged\n%s", out, want.Bytes())
				}
			}
			if e.agent == nil {
				return
			}
			calls := e.agent.got()
			if len(calls) != tt.wantCalls {
				t.Fatalf("agent got %d requests, want %d: %+v", len(calls), tt.wantCalls, calls)
			}
			if tt.wantCalls == 0 {
				return
			}
			c := calls[0]
			if c.path != cniapi.PathAdd {
				t.Errorf("path = %s, want %s", c.path, cniapi.PathAdd)
			}
			if tt.wantIPs != nil && !slices.Equal(c.req.IPs, tt.wantIPs) {
				t.Errorf("IPs = %v, want %v", c.req.IPs, tt.wantIPs)
			}
		})
	}
}

func TestAddSendsPodIdentity(t *testing.T) {
	e := newEnv(t, agentUp, "")
	if _, err := testPlugin(t).Add(context.Background(), cmdArgs(e.conf(t, nil), podArgs("prod", "web"))); err != nil {
		t.Fatal(err)
	}
	want := cniapi.Request{
		ContainerID: "c0ffee", Netns: "/var/run/netns/cni-1234", IfName: "eth0",
		PodName: "web", PodNamespace: "prod", PodUID: "uid-web",
		IPs: []string{"10.1.0.5", "fd00::5"},
	}
	got := e.agent.got()
	if len(got) != 1 {
		t.Fatalf("agent got %d requests, want 1", len(got))
	}
	if g, _ := json.Marshal(got[0].req); string(g) != mustJSON(t, want) {
		t.Errorf("request = %s\nwant      %s", g, mustJSON(t, want))
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
