package proxy

import (
	"sync"
)

// tracked is one open inbound connection, kept so a policy change can re-judge it. Istio
// only applies policy at connection start; users asked for more, and ztunnel is the only
// place that can close a connection already allowed.
type tracked struct {
	pod   string // UID of the destination pod
	check func() (allowed bool, reason string)
	close func(reason string)
}

// registry holds every open inbound connection.
type registry struct {
	mu    sync.Mutex
	next  uint64
	conns map[uint64]*tracked
}

func (r *registry) add(t *tracked) (remove func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conns == nil {
		r.conns = map[uint64]*tracked{}
	}
	r.next++
	id := r.next
	r.conns[id] = t
	return func() {
		r.mu.Lock()
		delete(r.conns, id)
		r.mu.Unlock()
	}
}

// reevaluate re-judges every open connection and closes those now denied. It returns how
// many it closed.
func (r *registry) reevaluate() int {
	r.mu.Lock()
	all := make([]*tracked, 0, len(r.conns))
	for _, t := range r.conns {
		all = append(all, t)
	}
	r.mu.Unlock()
	closed := 0
	for _, t := range all {
		if ok, reason := t.check(); !ok {
			t.close(reason)
			closed++
		}
	}
	return closed
}

// closePod closes every connection to one pod (the pod left the node).
func (r *registry) closePod(uid, reason string) {
	r.mu.Lock()
	var victims []*tracked
	for _, t := range r.conns {
		if t.pod == uid {
			victims = append(victims, t)
		}
	}
	r.mu.Unlock()
	for _, t := range victims {
		t.close(reason)
	}
}

func (r *registry) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.conns)
}
