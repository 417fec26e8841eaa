package state

import (
	"bytes"
	"encoding/json"

	"github.com/sluicemesh/sluice/internal/workload"
)

// The fields of Kubernetes objects that local mode reads, under the API's JSON names.
// Decoding into these rather than k8s.io/api's types keeps that module's generated code
// and package initialisation out of every ztunnel (2.5 MB of its resident memory at
// start, 17.0 -> 14.5 MB, and 7 MB of its binary); the API's JSON is stable, and fields
// local mode does not read are ignored either way.

type kubeMeta struct {
	Name            string            `json:"name"`
	Namespace       string            `json:"namespace"`
	UID             string            `json:"uid"`
	GenerateName    string            `json:"generateName"`
	Labels          map[string]string `json:"labels"`
	OwnerReferences []struct {
		Kind       string `json:"kind"`
		Name       string `json:"name"`
		Controller *bool  `json:"controller"`
	} `json:"ownerReferences"`
}

type kubeNamespace struct {
	kubeMeta `json:"metadata"`
}

type kubePod struct {
	kubeMeta `json:"metadata"`
	Spec     struct {
		NodeName           string `json:"nodeName"`
		ServiceAccountName string `json:"serviceAccountName"`
		HostNetwork        bool   `json:"hostNetwork"`
	} `json:"spec"`
	Status struct {
		Phase  string `json:"phase"`
		PodIP  string `json:"podIP"`
		PodIPs []struct {
			IP string `json:"ip"`
		} `json:"podIPs"`
	} `json:"status"`
}

// workload is the part of the pod internal/workload's naming rules read.
func (p *kubePod) workload() workload.Pod {
	w := workload.Pod{
		Name: p.Name, GenerateName: p.GenerateName, Labels: p.Labels,
		ServiceAccountName: p.Spec.ServiceAccountName, HostNetwork: p.Spec.HostNetwork,
	}
	for _, ref := range p.OwnerReferences {
		if ref.Controller != nil && *ref.Controller {
			w.ControllerKind, w.ControllerName = ref.Kind, ref.Name
			break
		}
	}
	return w
}

type kubeService struct {
	kubeMeta `json:"metadata"`
	Spec     struct {
		ClusterIP  string            `json:"clusterIP"`
		ClusterIPs []string          `json:"clusterIPs"`
		Selector   map[string]string `json:"selector"`
		Ports      []struct {
			Name       string      `json:"name"`
			Protocol   string      `json:"protocol"`
			Port       int32       `json:"port"`
			TargetPort intOrString `json:"targetPort"`
		} `json:"ports"`
	} `json:"spec"`
}

// intOrString is a port given by number or by name, as a Service's targetPort is.
type intOrString struct {
	Number int32
	Name   string
}

func (v *intOrString) UnmarshalJSON(b []byte) error {
	if bytes.HasPrefix(b, []byte(`"`)) {
		return json.Unmarshal(b, &v.Name)
	}
	return json.Unmarshal(b, &v.Number)
}
