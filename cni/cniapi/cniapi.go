// Package cniapi holds the wire types shared by the Sluice CNI plugin and the node agent.
//
// The plugin is a short-lived binary run by the container runtime; the agent is the
// long-lived DaemonSet that owns the BPF state. Keeping the types in their own package
// lets both sides, and their tests, agree on the protocol without importing each other.
package cniapi

import (
	"encoding/json"
	"fmt"
	"os"
)

// Paths the agent serves on, relative to the agent's URL over the unix socket.
const (
	PathAdd   = "/v1/cni/add"
	PathDel   = "/v1/cni/del"
	PathCheck = "/v1/cni/check"
)

// Defaults shared by the plugin config and the agent flags.
const (
	DefaultAgentSocket = "/var/run/sluice/cni.sock"
	DefaultStateFile   = "/var/run/sluice/mesh-state.json"
)

// Request is what the plugin sends the agent for ADD, DEL and CHECK.
type Request struct {
	ContainerID  string   `json:"containerID"`
	Netns        string   `json:"netns"`
	IfName       string   `json:"ifName"`
	PodName      string   `json:"podName,omitempty"`
	PodNamespace string   `json:"podNamespace,omitempty"`
	PodUID       string   `json:"podUID,omitempty"`
	IPs          []string `json:"ips,omitempty"` // pod addresses from prevResult, without prefix length
}

// Response is the agent's answer. Error is set (with a non-200 status) when the agent could
// not do what was asked; the plugin turns it into a CNI error.
type Response struct {
	Enrolled bool   `json:"enrolled"`
	Error    string `json:"error,omitempty"`
}

// MeshState is the file the agent keeps current so the plugin can tell, while the agent is
// unreachable, whether a pod would have been in the mesh (fail) or not (pass).
type MeshState struct {
	AmbientNamespaces []string `json:"ambientNamespaces"`
}

// ReadMeshState reads the state file written by the agent.
func ReadMeshState(path string) (MeshState, error) {
	var s MeshState
	b, err := os.ReadFile(path)
	if err != nil {
		return s, err
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return s, fmt.Errorf("parse mesh state %s: %w", path, err)
	}
	return s, nil
}

// Ambient reports whether namespace ns is in the mesh according to s.
func (s MeshState) Ambient(ns string) bool {
	for _, n := range s.AmbientNamespaces {
		if n == ns {
			return true
		}
	}
	return false
}
