package plugin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/sluicemesh/sluice/cni/cniapi"
)

// VersionInfo lists the CNI spec versions the plugin accepts. It starts at 0.3.0 because
// a chained plugin needs prevResult, which older specs do not have.
var VersionInfo = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// DefaultTimeout bounds each call to the agent when the config sets no "timeout". The
// runtime waits for ADD, so it must stay well below kubelet's own sandbox timeout.
const DefaultTimeout = 5 * time.Second

// DefaultExcludeNamespaces are namespaces whose pods never go to the agent. kube-system is
// excluded so that a node whose agent is broken can still start the pods (DNS, the
// primary CNI's own pods) needed to repair it.
var DefaultExcludeNamespaces = []string{"kube-system"}

// Config is the plugin's entry in the conflist as the runtime passes it on stdin, with
// defaults applied. Fields the plugin does not know (capabilities, runtimeConfig, ...) are
// ignored.
type Config struct {
	CNIVersion string `json:"cniVersion"`
	Name       string `json:"name"`
	Type       string `json:"type"`

	// PrevResult is kept as raw bytes so that ADD can hand it back byte for byte: a
	// round trip through the typed result would drop fields this library does not know.
	PrevResult json.RawMessage `json:"prevResult,omitempty"`

	AgentSocket       string   `json:"agentSocket,omitempty"`
	StateFile         string   `json:"stateFile,omitempty"`
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
	TimeoutString     string   `json:"timeout,omitempty"`

	// Timeout is TimeoutString parsed; it bounds each call to the agent.
	Timeout time.Duration `json:"-"`
}

// ParseConfig decodes the network config the runtime passes on stdin and fills in
// defaults. Errors are *types.Error with a code and a message naming the bad field, so the
// runtime can show the user what to fix in the conflist.
func ParseConfig(stdin []byte) (*Config, error) {
	if len(bytes.TrimSpace(stdin)) == 0 {
		return nil, types.NewError(types.ErrDecodingFailure, "empty network config on stdin", "")
	}
	conf := &Config{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, decodeError(err)
	}

	if conf.CNIVersion == "" {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			`network config field "cniVersion" is missing`, "")
	}
	if !slices.Contains(VersionInfo.SupportedVersions(), conf.CNIVersion) {
		return nil, types.NewError(types.ErrIncompatibleCNIVersion,
			fmt.Sprintf(`network config field "cniVersion" is %q; sluice-cni supports %s`,
				conf.CNIVersion, strings.Join(VersionInfo.SupportedVersions(), ", ")), "")
	}

	if conf.AgentSocket == "" {
		conf.AgentSocket = cniapi.DefaultAgentSocket
	}
	if conf.StateFile == "" {
		conf.StateFile = cniapi.DefaultStateFile
	}
	// Absent means the default; an explicit [] means "exclude nothing".
	if conf.ExcludeNamespaces == nil {
		conf.ExcludeNamespaces = slices.Clone(DefaultExcludeNamespaces)
	}
	conf.Timeout = DefaultTimeout
	if conf.TimeoutString != "" {
		d, err := time.ParseDuration(conf.TimeoutString)
		if err != nil || d <= 0 {
			return nil, types.NewError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf(`network config field "timeout" is %q; want a positive duration such as "5s"`,
					conf.TimeoutString), "")
		}
		conf.Timeout = d
	}
	return conf, nil
}

// decodeError turns a JSON error into a CNI error that points at the offending field when
// encoding/json knows it.
func decodeError(err error) *types.Error {
	var typeErr *json.UnmarshalTypeError
	if !errors.As(err, &typeErr) {
		return types.NewError(types.ErrDecodingFailure,
			fmt.Sprintf("network config on stdin is not valid JSON: %v", err), "")
	}
	if typeErr.Field == "" {
		return types.NewError(types.ErrDecodingFailure,
			fmt.Sprintf("network config on stdin must be a JSON object, got a JSON %s", typeErr.Value), "")
	}
	want := "another type"
	if typeErr.Type != nil {
		switch typeErr.Type.Kind() {
		case reflect.Slice, reflect.Array:
			want = "a list"
		case reflect.Map, reflect.Struct:
			want = "an object"
		default:
			want = "a " + typeErr.Type.Kind().String()
		}
	}
	return types.NewError(types.ErrInvalidNetworkConfig,
		fmt.Sprintf("network config field %q has the wrong type: got a JSON %s, want %s",
			typeErr.Field, typeErr.Value, want), "")
}

// hasPrevResult reports whether the runtime passed a prevResult; "null" counts as none.
func (c *Config) hasPrevResult() bool {
	p := bytes.TrimSpace(c.PrevResult)
	return len(p) > 0 && !bytes.Equal(p, []byte("null"))
}

// excluded reports whether pods of namespace ns bypass the agent.
func (c *Config) excluded(ns string) bool {
	return slices.Contains(c.ExcludeNamespaces, ns)
}

// PodIPs returns the addresses in prevResult without prefix length, in the order the
// primary plugin listed them. prevResult in any supported spec version is accepted.
func (c *Config) PodIPs() ([]string, error) {
	if !c.hasPrevResult() {
		return nil, nil
	}
	// version.ParsePrevResult wants the generic map form and mutates it, so decode a
	// private copy and leave c.PrevResult untouched for printing.
	raw := map[string]any{}
	if err := json.Unmarshal(c.PrevResult, &raw); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure,
			fmt.Sprintf(`network config field "prevResult" is not a JSON object: %v`, err), "")
	}
	pc := &types.PluginConf{CNIVersion: c.CNIVersion, RawPrevResult: raw}
	if err := version.ParsePrevResult(pc); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure,
			fmt.Sprintf(`network config field "prevResult" is not a CNI %s result: %v`, c.CNIVersion, err), "")
	}
	res, err := types100.NewResultFromResult(pc.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure,
			fmt.Sprintf(`network config field "prevResult" cannot be converted: %v`, err), "")
	}
	ips := make([]string, 0, len(res.IPs))
	for _, ip := range res.IPs {
		if ip == nil || ip.Address.IP == nil {
			continue
		}
		ips = append(ips, ip.Address.IP.String())
	}
	return ips, nil
}

// Pod is the Kubernetes identity the runtime passes in CNI_ARGS.
type Pod struct {
	Name      string
	Namespace string
	UID       string
}

// known reports whether the runtime told us which pod this is. Runtimes outside
// Kubernetes (or a bare `cnitool`) do not, and such sandboxes are never in the mesh.
func (p Pod) known() bool { return p.Name != "" && p.Namespace != "" }

func (p Pod) String() string { return p.Namespace + "/" + p.Name }

// k8sArgs mirrors the keys kubelet's runtimes put in CNI_ARGS; the names are fixed by
// them, hence the underscores.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAME      types.UnmarshallableString //nolint:revive
	K8S_POD_NAMESPACE types.UnmarshallableString //nolint:revive
	K8S_POD_UID       types.UnmarshallableString //nolint:revive
}

// ParsePod reads the pod identity from CNI_ARGS ("K=V;K=V"). Keys it does not know, such
// as K8S_POD_INFRA_CONTAINER_ID, are ignored.
func ParsePod(cniArgs string) (Pod, error) {
	a := k8sArgs{}
	a.IgnoreUnknown = true
	if err := types.LoadArgs(cniArgs, &a); err != nil {
		return Pod{}, types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("CNI_ARGS %q cannot be parsed: %v", cniArgs, err), "")
	}
	return Pod{
		Name:      string(a.K8S_POD_NAME),
		Namespace: string(a.K8S_POD_NAMESPACE),
		UID:       string(a.K8S_POD_UID),
	}, nil
}
