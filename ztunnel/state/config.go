package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/sluicemesh/sluice/internal/manifest"
	"github.com/sluicemesh/sluice/ztunnel/policy"
)

// LocalConfig is the file ztunnel reads in local mode (no controller): the workloads and
// services of the mesh, and Istio AuthorizationPolicy / PeerAuthentication objects exactly
// as users write them.
//
//	trustDomain: cluster.local
//	rootNamespace: istio-system
//	workloads:
//	- {uid: u1, name: a, namespace: mesh, serviceAccount: sa-a, node: node0, ips: [10.244.0.2]}
//	services:
//	- {name: b, namespace: mesh, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], selector: {app: b}}
//	policies:
//	- apiVersion: security.istio.io/v1
//	  kind: AuthorizationPolicy
//	  metadata: {name: allow-a, namespace: mesh}
//	  spec: {action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/sa-a]}}]}]}
type LocalConfig struct {
	TrustDomain   string            `json:"trustDomain,omitempty"`
	RootNamespace string            `json:"rootNamespace,omitempty"`
	Workloads     []*Workload       `json:"workloads,omitempty"`
	Services      []*Service        `json:"services,omitempty"`
	Policies      []json.RawMessage `json:"policies,omitempty"`
}

// ParseLocalConfig builds a snapshot from a local config file's contents. A file that
// cannot be read as a whole, a policy whose kind or name cannot be read, or a workload or
// service that is invalid is an error: the caller keeps its previous snapshot, because
// dropping a policy could open access and dropping a workload would send it plain TCP.
// Problems confined to one entry (an invalid policy field, a clashing address) are
// returned as warnings; the snapshot then enforces what the policy package documents for
// rejected policies (fail closed) and leaves out clashing entries.
func ParseLocalConfig(version uint64, data []byte) (*Snapshot, []error, error) {
	var cfg LocalConfig
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		return nil, nil, fmt.Errorf("local config: %w", err)
	}
	var (
		authz []policy.AuthorizationPolicy
		peer  []policy.PeerAuthentication
	)
	for i, raw := range cfg.Policies {
		var meta struct {
			Kind string `json:"kind"`
		}
		if err := json.Unmarshal(raw, &meta); err != nil {
			return nil, nil, fmt.Errorf("local config: policies[%d]: %w", i, err)
		}
		where := fmt.Sprintf("local config: policies[%d]", i)
		if !isPolicyKind(meta.Kind) {
			return nil, nil, fmt.Errorf("%s: kind %q is not AuthorizationPolicy or PeerAuthentication", where, meta.Kind)
		}
		if err := addPolicy(meta.Kind, raw, where, &authz, &peer); err != nil {
			return nil, nil, err
		}
	}
	if err := refuse(entryErrors(cfg.Workloads, cfg.Services)...); err != nil {
		return nil, nil, fmt.Errorf("local config: %w", err)
	}
	set, warnings := policy.Compile(cfg.RootNamespace, authz, peer)
	snap, errs := NewSnapshot(version, cfg.TrustDomain, cfg.Workloads, cfg.Services, set)
	return snap, append(warnings, errs...), nil
}

func isPolicyKind(kind string) bool {
	return kind == "AuthorizationPolicy" || kind == "PeerAuthentication"
}

// addPolicy parses one Istio policy object of the given kind. A policy that cannot even
// be named is an error for the whole config: dropping it could open access. Anything
// else wrong with it is left to policy.Compile, which fails it closed.
func addPolicy(kind string, doc []byte, where string, authz *[]policy.AuthorizationPolicy, peer *[]policy.PeerAuthentication) error {
	switch kind {
	case "AuthorizationPolicy":
		ap, err := policy.ParseAuthorizationPolicyYAML(doc)
		if ap.Name == "" {
			return fmt.Errorf("%s: AuthorizationPolicy without a readable metadata.name: %v", where, err)
		}
		*authz = append(*authz, ap)
	case "PeerAuthentication":
		pa, err := policy.ParsePeerAuthenticationYAML(doc)
		if pa.Name == "" {
			return fmt.Errorf("%s: PeerAuthentication without a readable metadata.name: %v", where, err)
		}
		*peer = append(*peer, pa)
	}
	return nil
}

// WatchLocalConfig loads path into store and reloads it when it changes, until ctx
// ends. path is a LocalConfig file, or a directory of Kubernetes manifests (ParseDir).
// The first load must succeed; later bad versions are logged and the last good snapshot
// stays in force.
func WatchLocalConfig(ctx context.Context, path string, store *Store, log *slog.Logger) error {
	var (
		version uint64
		last    string
	)
	load := func() error {
		st, err := os.Stat(path)
		if err != nil {
			return err
		}
		stamp := fmt.Sprintf("%d:%d", st.Size(), st.ModTime().UnixNano())
		if st.IsDir() {
			if stamp, err = manifest.Stamp(path); err != nil {
				return err
			}
		}
		if stamp == last {
			return nil
		}
		version++
		var (
			snap     *Snapshot
			warnings []error
		)
		if st.IsDir() {
			snap, warnings, err = ParseDir(version, path)
		} else {
			var data []byte
			if data, err = os.ReadFile(path); err == nil {
				snap, warnings, err = ParseLocalConfig(version, data)
			}
		}
		if err != nil {
			return err
		}
		for _, w := range warnings {
			log.Warn("local config", "problem", w)
		}
		last = stamp
		store.Replace(snap)
		log.Info("local config loaded", "path", path, "version", version,
			"workloads", len(snap.Workloads()), "services", len(snap.Services()))
		return nil
	}
	if err := load(); err != nil {
		return fmt.Errorf("load %s: %w", path, err)
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if err := load(); err != nil && !errors.Is(err, context.Canceled) {
				log.Error("local config not reloaded; keeping the previous version", "path", path, "err", err)
			}
		}
	}
}
