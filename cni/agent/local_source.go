package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"

	"github.com/sluicemesh/sluice/internal/manifest"
)

// LocalSource reads Pod and Namespace manifests from a directory tree (the local lab's
// registry, or any directory of Kubernetes YAML), so the agent runs without a cluster. It
// polls: the directory is small and polling survives editors that replace files.
type LocalSource struct {
	// Dir holds *.yaml / *.json manifests of kind Pod and Namespace, in any subfolders.
	Dir string
	// NodeName keeps pods whose spec.nodeName is this node; empty keeps every pod.
	NodeName string
	// Interval between scans (default 200ms).
	Interval time.Duration
	Logger   *slog.Logger

	mu     sync.RWMutex
	pods   map[string]*corev1.Pod
	nss    map[string]*corev1.Namespace
	synced bool
	// podFile and nsFile name the file each object came from (scan's goroutine only).
	podFile, nsFile map[string]string
}

func (s *LocalSource) Synced() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.synced
}

func (s *LocalSource) Pod(key string) (*corev1.Pod, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	p, ok := s.pods[key]
	return p, ok
}

func (s *LocalSource) Pods() []*corev1.Pod {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*corev1.Pod, 0, len(s.pods))
	for _, p := range s.pods {
		out = append(out, p)
	}
	return out
}

func (s *LocalSource) Namespace(name string) (*corev1.Namespace, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	n, ok := s.nss[name]
	return n, ok
}

func (s *LocalSource) Namespaces() []*corev1.Namespace {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*corev1.Namespace, 0, len(s.nss))
	for _, n := range s.nss {
		out = append(out, n)
	}
	return out
}

func (s *LocalSource) Run(ctx context.Context, changed func(key string)) error {
	interval := s.Interval
	if interval == 0 {
		interval = 200 * time.Millisecond
	}
	log := s.Logger
	if log == nil {
		log = slog.Default()
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	var lastErr string
	for {
		// Logged when the problem changes, not on every scan.
		err := s.scan(changed)
		switch {
		case err != nil && err.Error() != lastErr:
			log.Warn("reading local pod registry; what the failing files held before is kept", "dir", s.Dir, "err", err)
			lastErr = err.Error()
		case err == nil && lastErr != "":
			log.Info("local pod registry reads cleanly again", "dir", s.Dir)
			lastErr = ""
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// scan reads the directory and reports what changed since the last scan. A file that does
// not parse is reported and skipped; it never hides the other objects. The objects that
// file held before stay as they were until it parses again (or is removed): a typo in a
// namespace's manifest must not take its pods out of the mesh. (After an agent restart
// there is nothing to keep: such a namespace is unknown until it is fixed.)
func (s *LocalSource) scan(changed func(string)) error {
	pods := map[string]*corev1.Pod{}
	nss := map[string]*corev1.Namespace{}
	podFile, nsFile := map[string]string{}, map[string]string{}
	docs, errs, err := manifest.ReadDir(s.Dir)
	keepAll := false
	if err != nil && !errors.Is(err, fs.ErrNotExist) { // no directory yet: nothing in it
		errs = append(errs, err)
		keepAll = true // the walk stopped: any file may be missing from docs
	}
	failing := map[string]bool{}
	for _, err := range errs {
		if fe := (*manifest.FileError)(nil); errors.As(err, &fe) {
			failing[fe.Path] = true
		}
	}
	for _, d := range docs {
		switch d.Kind {
		case "Pod":
			var p corev1.Pod
			if err := json.Unmarshal(d.JSON, &p); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", d.Where, err))
				failing[d.Path] = true
				continue
			}
			if p.Namespace == "" {
				p.Namespace = "default"
			}
			if s.NodeName == "" || p.Spec.NodeName == s.NodeName {
				key := podKey(p.Namespace, p.Name)
				pods[key], podFile[key] = &p, d.Path
			}
		case "Namespace":
			var n corev1.Namespace
			if err := json.Unmarshal(d.JSON, &n); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", d.Where, err))
				failing[d.Path] = true
				continue
			}
			nss[n.Name], nsFile[n.Name] = &n, d.Path
		}
	}

	s.mu.Lock()
	oldPods, oldNss := s.pods, s.nss
	for key, p := range oldPods {
		if _, ok := pods[key]; !ok && (keepAll || failing[s.podFile[key]]) {
			pods[key], podFile[key] = p, s.podFile[key]
		}
	}
	for name, n := range oldNss {
		if _, ok := nss[name]; !ok && (keepAll || failing[s.nsFile[name]]) {
			nss[name], nsFile[name] = n, s.nsFile[name]
		}
	}
	s.podFile, s.nsFile = podFile, nsFile
	s.pods, s.nss, s.synced = pods, nss, true
	s.mu.Unlock()

	for key, p := range pods {
		old, ok := oldPods[key]
		if !ok || !equality.Semantic.DeepEqual(old, p) || !equality.Semantic.DeepEqual(oldNss[p.Namespace], nss[p.Namespace]) {
			changed(key)
		}
	}
	for key := range oldPods {
		if _, ok := pods[key]; !ok {
			changed(key)
		}
	}
	var report []error
	for _, err := range errs {
		if !errors.Is(err, fs.ErrNotExist) { // removed while we read: the next scan sees it
			report = append(report, err)
		}
	}
	return errors.Join(report...)
}
