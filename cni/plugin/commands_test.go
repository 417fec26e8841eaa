package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/sluicemesh/sluice/cni/cniapi"
)

func TestDel(t *testing.T) {
	tests := []struct {
		name      string
		mode      string
		respond   func(http.ResponseWriter, *http.Request, cniapi.Request)
		conf      map[string]any
		stdin     string
		args      string
		addFirst  bool // ADD the pod before DEL so the agent knows it
		dels      int  // how many DELs to run; default 1
		wantCode  uint
		wantMsg   []string
		wantCalls []string // paths the agent saw
	}{
		{name: "known container", mode: agentUp, addFirst: true, wantCalls: []string{cniapi.PathAdd, cniapi.PathDel}},
		{name: "repeated DEL", mode: agentUp, addFirst: true, dels: 3,
			wantCalls: []string{cniapi.PathAdd, cniapi.PathDel, cniapi.PathDel, cniapi.PathDel}},
		{name: "unknown container", mode: agentUp, wantCalls: []string{cniapi.PathDel}},
		{name: "agent refuses", mode: agentUp, respond: refuse(http.StatusInternalServerError, "boom"), wantCalls: []string{cniapi.PathDel}},
		{name: "agent hangs", mode: agentUp, respond: hang, conf: map[string]any{"timeout": "50ms"}, wantCalls: []string{cniapi.PathDel}},
		{name: "agent down, no state file", mode: agentDown, dels: 2},
		{name: "stale socket", mode: agentStale},
		{name: "without prevResult", mode: agentUp, conf: map[string]any{"prevResult": nil}, wantCalls: []string{cniapi.PathDel}},
		{name: "unparsable prevResult", mode: agentUp, conf: map[string]any{"prevResult": json.RawMessage(`{"ips":7}`)},
			wantCalls: []string{cniapi.PathDel}},
		{name: "excluded namespace", mode: agentUp, args: podArgs("kube-system", "coredns")},
		{name: "no pod args", mode: agentUp, args: "IgnoreUnknown=true"},
		{name: "unparsable CNI_ARGS", mode: agentUp, args: "K8S_POD_NAME"},
		{name: "bad JSON", mode: agentUp, stdin: "{", wantCode: types.ErrDecodingFailure},
		{name: "unsupported cniVersion", mode: agentUp, conf: map[string]any{"cniVersion": "9.9.9"},
			wantCode: types.ErrIncompatibleCNIVersion, wantMsg: []string{"cniVersion"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, tt.mode, "")
			p := testPlugin(t)
			args := tt.args
			if args == "" {
				args = podArgs("prod", "web")
			}
			if tt.addFirst {
				if _, err := p.Add(context.Background(), cmdArgs(e.conf(t, nil), args)); err != nil {
					t.Fatalf("ADD: %v", err)
				}
			}
			if tt.respond != nil {
				e.agent.respond = tt.respond
			}
			stdin := e.conf(t, tt.conf)
			if tt.stdin != "" {
				stdin = []byte(tt.stdin)
			}
			dels := max(tt.dels, 1)
			for i := range dels {
				a := cmdArgs(stdin, args)
				a.Netns = "" // runtimes may pass no netns on DEL once the sandbox is gone
				err := p.Del(context.Background(), a)
				checkErr(t, err, tt.wantCode, tt.wantMsg)
				if err != nil && i == 0 {
					break
				}
			}
			if e.agent == nil {
				return
			}
			var paths []string
			for _, c := range e.agent.got() {
				paths = append(paths, c.path)
			}
			if !slices.Equal(paths, tt.wantCalls) {
				t.Errorf("agent saw %v, want %v", paths, tt.wantCalls)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	tests := []struct {
		name      string
		mode      string
		state     string
		addFirst  bool
		args      string
		wantCode  uint
		wantMsg   []string
		wantCalls int
	}{
		{name: "enrolled pod", mode: agentUp, addFirst: true, wantCalls: 2},
		{name: "agent does not know pod", mode: agentUp, wantCode: types.ErrInternal, wantMsg: []string{"refused CHECK", "unknown container"}, wantCalls: 1},
		{name: "excluded namespace", mode: agentUp, args: podArgs("kube-system", "coredns")},
		{name: "agent down, namespace ambient", mode: agentDown, state: stateAmbient,
			wantCode: types.ErrTryAgainLater, wantMsg: []string{"unreachable", "cannot start uncaptured"}},
		{name: "agent down, namespace not ambient", mode: agentDown, state: stateNotAmbient},
		{name: "agent down, state file missing", mode: agentDown, wantCode: types.ErrTryAgainLater, wantMsg: []string{"unreachable"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, tt.mode, tt.state)
			p := testPlugin(t)
			args := tt.args
			if args == "" {
				args = podArgs("prod", "web")
			}
			stdin := e.conf(t, nil)
			if tt.addFirst {
				if _, err := p.Add(context.Background(), cmdArgs(stdin, args)); err != nil {
					t.Fatalf("ADD: %v", err)
				}
			}
			checkErr(t, p.Check(context.Background(), cmdArgs(stdin, args)), tt.wantCode, tt.wantMsg)
			if e.agent == nil {
				return
			}
			calls := e.agent.got()
			if len(calls) != tt.wantCalls {
				t.Fatalf("agent got %d requests, want %d", len(calls), tt.wantCalls)
			}
			if n := len(calls); n > 0 && calls[n-1].path != cniapi.PathCheck {
				t.Errorf("last path = %s, want %s", calls[n-1].path, cniapi.PathCheck)
			}
		})
	}
}

func TestStatus(t *testing.T) {
	e := newEnv(t, agentDown, "")
	p := testPlugin(t)
	// An absent agent does not make the node's network unready; see Plugin.Status.
	if err := p.Status(context.Background(), cmdArgs(e.conf(t, map[string]any{"cniVersion": "1.1.0", "prevResult": nil}), "")); err != nil {
		t.Errorf("STATUS with agent down: %v", err)
	}
	err := p.Status(context.Background(), cmdArgs(e.conf(t, map[string]any{"cniVersion": "1.1.0", "timeout": "-1s"}), ""))
	checkErr(t, err, types.ErrInvalidNetworkConfig, []string{"timeout"})
}

func TestVersionInfo(t *testing.T) {
	var buf bytes.Buffer
	if err := VersionInfo.Encode(&buf); err != nil {
		t.Fatal(err)
	}
	var got struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
		t.Fatalf("VERSION output %q: %v", buf.Bytes(), err)
	}
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		if !slices.Contains(got.SupportedVersions, v) {
			t.Errorf("supportedVersions %v lacks %s", got.SupportedVersions, v)
		}
	}
}

func TestParsePodIgnoresUnknownArgs(t *testing.T) {
	pod, err := ParsePod("K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web;K8S_POD_UID=u1;SOMETHING_ELSE=x")
	if err != nil {
		t.Fatal(err)
	}
	if want := (Pod{Name: "web", Namespace: "prod", UID: "u1"}); pod != want {
		t.Errorf("pod = %+v, want %+v", pod, want)
	}
}
