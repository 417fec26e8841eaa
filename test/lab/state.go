//go:build linux

package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

const (
	stateFileName = "state.json"
	lockFileName  = "lock"
	stateVersion  = 1
)

// state is everything the lab created, persisted in StateDir so that another process
// (sluicectl, Cleanup after a crash) can find and remove it. Entries are written before
// the objects they describe are created, so a crash at any point leaves a trace.
type state struct {
	Version    int                   `json:"version"`
	Config     Config                `json:"config"`
	Fabric     Fabric                `json:"fabric"`
	Nodes      []Node                `json:"nodes"`
	Namespaces map[string]*namespace `json:"namespaces"`
	Pods       []*Pod                `json:"pods"`
	// ResourceVersion counts manifest writes, so registry readers can order them.
	ResourceVersion uint64 `json:"resourceVersion"`
}

type namespace struct {
	UID       string            `json:"uid"`
	Labels    map[string]string `json:"labels,omitempty"`
	CreatedAt time.Time         `json:"createdAt"`
}

func (st *state) pod(nsName, name string) (int, *Pod) {
	for i, p := range st.Pods {
		if p.Namespace == nsName && p.Name == name {
			return i, p
		}
	}
	return -1, nil
}

func (st *state) removePod(nsName, name string) {
	if i, _ := st.pod(nsName, name); i >= 0 {
		st.Pods = append(st.Pods[:i], st.Pods[i+1:]...)
	}
}

// nextResourceVersion returns a fresh resourceVersion for a manifest write.
func (st *state) nextResourceVersion() string {
	st.ResourceVersion++
	return fmt.Sprint(st.ResourceVersion)
}

func readState(dir string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFileName))
	if err != nil {
		return nil, err
	}
	st := &state{}
	if err := json.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("parse lab state %s: %w", filepath.Join(dir, stateFileName), err)
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("lab state %s has version %d, this build reads %d; remove the lab with the sluicectl that made it", filepath.Join(dir, stateFileName), st.Version, stateVersion)
	}
	if st.Namespaces == nil {
		st.Namespaces = map[string]*namespace{}
	}
	return st, nil
}

func writeState(dir string, st *state) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode lab state: %w", err)
	}
	return writeFileAtomic(filepath.Join(dir, stateFileName), append(b, '\n'))
}

// lockState takes the lab's file lock, which serialises changes between processes. It
// waits until ctx is done.
func lockState(ctx context.Context, dir string) (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(dir, lockFileName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lab lock: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing releases the lock
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for lock %s held by another process: %w", f.Name(), ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// writeFileAtomic replaces path with data so that readers see the old or the new
// content, never a partial file.
func writeFileAtomic(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, werr := f.Write(data)
	cerr := f.Close()
	if err := errors.Join(werr, cerr); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Chmod(tmp, 0o644); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func removeFile(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
