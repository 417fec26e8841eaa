//go:build linux

package agent

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/sluicemesh/sluice/cni/cniapi"
	"github.com/sluicemesh/sluice/internal/kubeworkload"
	"github.com/sluicemesh/sluice/internal/workload"
)

// cniHandler serves the plugin's ADD/DEL/CHECK (docs/capture-design.md).
func (a *Agent) cniHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+cniapi.PathAdd, a.handle(a.cniAdd))
	mux.HandleFunc("POST "+cniapi.PathDel, a.handle(a.cniDel))
	mux.HandleFunc("POST "+cniapi.PathCheck, a.handle(a.cniCheck))
	return mux
}

// retryable marks an error the runtime should retry (the plugin maps 503 to CNI's
// "try again later").
type retryable struct{ error }

func (a *Agent) handle(fn func(*cniapi.Request) (bool, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req cniapi.Request
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
		if err := dec.Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, cniapi.Response{Error: "malformed request: " + err.Error()})
			return
		}
		if req.PodUID == "" && req.ContainerID == "" {
			writeJSON(w, http.StatusBadRequest, cniapi.Response{Error: "request names neither podUID nor containerID"})
			return
		}
		enrolled, err := fn(&req)
		if err != nil {
			status := http.StatusInternalServerError
			if _, ok := err.(retryable); ok {
				status = http.StatusServiceUnavailable
			}
			a.log.Warn("CNI request failed", "path", r.URL.Path, "pod", podKey(req.PodNamespace, req.PodName), "err", err)
			writeJSON(w, status, cniapi.Response{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, cniapi.Response{Enrolled: enrolled})
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// cniAdd records the pod's namespace and, if the pod is in the mesh, enrolls it before
// answering: the runtime starts the pod only after capture is in place.
func (a *Agent) cniAdd(req *cniapi.Request) (bool, error) {
	<-a.ready
	key := podKey(req.PodNamespace, req.PodName)
	pod, ns := a.waitForPod(key, req.PodUID)

	a.mu.Lock()
	defer a.mu.Unlock()
	defer a.writeMeshStateLocked()
	rec := a.pods[req.PodUID]
	if rec != nil && rec.Netns != req.Netns && rec.Cookie != 0 {
		// A new sandbox for the same pod: the old namespace's capture goes first.
		if err := a.unenrollLocked(rec); err != nil {
			a.log.Warn("unenroll replaced sandbox", "pod", key, "err", err)
		}
	}
	if rec == nil {
		rec = &record{UID: req.PodUID}
		a.pods[rec.UID] = rec
	}
	rec.Namespace, rec.Name, rec.ContainerID, rec.Netns, rec.IPs = req.PodNamespace, req.PodName, req.ContainerID, req.Netns, req.IPs
	if err := a.records.save(rec); err != nil {
		return false, fmt.Errorf("save pod record: %w", err)
	}

	if pod == nil {
		if workload.NamespaceAmbient(kubeworkload.NamespaceLabels(ns)) {
			return false, retryable{fmt.Errorf("pod %s is in ambient namespace %s but the node agent has not seen the pod yet; the runtime will retry", key, req.PodNamespace)}
		}
		return false, nil
	}
	if !InMesh(pod, ns) {
		return false, nil
	}
	if rec.Cookie != 0 {
		return true, nil
	}
	if err := a.enrollLocked(rec, pod); err != nil {
		return false, err
	}
	return true, nil
}

// waitForPod gives the source (an informer, or the lab registry) time to learn of a pod
// the runtime is creating right now.
func (a *Agent) waitForPod(key, uid string) (*corev1.Pod, *corev1.Namespace) {
	deadline := time.Now().Add(a.cfg.PodWait)
	for {
		pod, ok := a.cfg.Source.Pod(key)
		if ok && (uid == "" || string(pod.UID) == uid) {
			ns, _ := a.cfg.Source.Namespace(pod.Namespace)
			return pod, ns
		}
		if time.Now().After(deadline) {
			ns, _ := a.cfg.Source.Namespace(namespaceOf(key))
			return nil, ns
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func namespaceOf(key string) string {
	for i := range key {
		if key[i] == '/' {
			return key[:i]
		}
	}
	return key
}

// cniDel releases the pod; unknown pods are fine (DEL is idempotent).
func (a *Agent) cniDel(req *cniapi.Request) (bool, error) {
	<-a.ready
	a.mu.Lock()
	defer a.mu.Unlock()
	rec := a.pods[req.PodUID]
	if rec == nil {
		for _, r := range a.pods {
			if req.ContainerID != "" && r.ContainerID == req.ContainerID {
				rec = r
			}
		}
	}
	if rec == nil {
		return false, nil
	}
	if req.ContainerID != "" && rec.ContainerID != "" && rec.ContainerID != req.ContainerID {
		return false, nil // DEL of an older sandbox: the current one stays
	}
	err := a.unenrollLocked(rec)
	a.forgetLocked(rec)
	return false, err
}

// cniCheck reports whether a pod that should be captured is.
func (a *Agent) cniCheck(req *cniapi.Request) (bool, error) {
	<-a.ready
	key := podKey(req.PodNamespace, req.PodName)
	pod, _ := a.cfg.Source.Pod(key)
	ns, _ := a.cfg.Source.Namespace(req.PodNamespace)
	a.mu.Lock()
	defer a.mu.Unlock()
	rec := a.pods[req.PodUID]
	if !InMesh(pod, ns) {
		return false, nil
	}
	if rec == nil || rec.Cookie == 0 {
		return false, fmt.Errorf("pod %s is in the mesh but not captured", key)
	}
	enrolled, err := a.capture.Enrolled()
	if err != nil {
		return false, err
	}
	if !slices.Contains(enrolled, rec.Cookie) {
		return false, fmt.Errorf("pod %s should be captured but its namespace is not enrolled in BPF", key)
	}
	return true, nil
}
