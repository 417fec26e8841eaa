package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// record is what the agent knows of a pod's network: learned from CNI ADD (or found by
// scanning), kept on disk so a restarted agent can find every pod's namespace again.
type record struct {
	UID         string   `json:"uid"`
	Namespace   string   `json:"namespace"`
	Name        string   `json:"name"`
	ContainerID string   `json:"containerID,omitempty"`
	Netns       string   `json:"netns"`
	IPs         []string `json:"ips,omitempty"`
	// ServiceAccount and Labels are the pod's when it was last enrolled, so a restarted
	// agent can describe the pod to ztunnel before its source has synced.
	ServiceAccount string            `json:"serviceAccount,omitempty"`
	Labels         map[string]string `json:"labels,omitempty"`
	// Cookie is the netns cookie while enrolled, 0 otherwise.
	Cookie uint64 `json:"cookie,omitempty"`
}

func (r *record) key() string { return podKey(r.Namespace, r.Name) }

// recordStore persists records as one JSON file per pod, written atomically.
type recordStore struct{ dir string }

func (s recordStore) path(uid string) string {
	return filepath.Join(s.dir, strings.ReplaceAll(uid, "/", "_")+".json")
}

func (s recordStore) save(r *record) error {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := s.path(r.UID) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, s.path(r.UID))
}

func (s recordStore) remove(uid string) error {
	if err := os.Remove(s.path(uid)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (s recordStore) load() ([]*record, error) {
	entries, err := os.ReadDir(s.dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*record
	var errs []error
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(s.dir, e.Name()))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var r record
		if err := json.Unmarshal(b, &r); err != nil || r.UID == "" {
			errs = append(errs, fmt.Errorf("pod record %s is unreadable, ignoring it: %v", e.Name(), err))
			continue
		}
		out = append(out, &r)
	}
	return out, errors.Join(errs...)
}
