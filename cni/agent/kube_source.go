package agent

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listerv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// KubeSource watches the pods scheduled to this node and all namespaces through
// client-go informers.
type KubeSource struct {
	Client   kubernetes.Interface
	NodeName string
	// Resync is the informers' resync period (default 10 minutes).
	Resync time.Duration

	pods   listerv1.PodLister
	nss    listerv1.NamespaceLister
	synced atomic.Bool
}

func (s *KubeSource) Run(ctx context.Context, changed func(key string)) error {
	resync := s.Resync
	if resync == 0 {
		resync = 10 * time.Minute
	}
	podFactory := informers.NewSharedInformerFactoryWithOptions(s.Client, resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", s.NodeName).String()
		}))
	nsFactory := informers.NewSharedInformerFactory(s.Client, resync)
	podInf := podFactory.Core().V1().Pods()
	nsInf := nsFactory.Core().V1().Namespaces()
	s.pods, s.nss = podInf.Lister(), nsInf.Lister()

	// Informers only enqueue keys; the agent's reconcile reads the listers.
	podHandler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { enqueuePod(obj, changed) },
		UpdateFunc: func(_, obj any) { enqueuePod(obj, changed) },
		DeleteFunc: func(obj any) { enqueuePod(obj, changed) },
	}
	nsHandler := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		ns, ok := obj.(*corev1.Namespace)
		if !ok {
			return
		}
		pods, _ := s.pods.Pods(ns.Name).List(everything)
		for _, p := range pods {
			changed(podKey(p.Namespace, p.Name))
		}
	}
	if _, err := podInf.Informer().AddEventHandler(podHandler); err != nil {
		return err
	}
	if _, err := nsInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    nsHandler,
		UpdateFunc: func(_, obj any) { nsHandler(obj) },
		DeleteFunc: nsHandler,
	}); err != nil {
		return err
	}
	podFactory.Start(ctx.Done())
	nsFactory.Start(ctx.Done())
	for typ, ok := range podFactory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("pod informer %v did not sync", typ)
		}
	}
	for typ, ok := range nsFactory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("namespace informer %v did not sync", typ)
		}
	}
	s.synced.Store(true)
	<-ctx.Done()
	podFactory.Shutdown()
	nsFactory.Shutdown()
	return nil
}

func enqueuePod(obj any, changed func(string)) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if p, ok := obj.(*corev1.Pod); ok {
		changed(podKey(p.Namespace, p.Name))
	}
}

func (s *KubeSource) Synced() bool { return s.synced.Load() }

func (s *KubeSource) Pod(key string) (*corev1.Pod, bool) {
	if s.pods == nil {
		return nil, false
	}
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil, false
	}
	p, err := s.pods.Pods(ns).Get(name)
	return p, err == nil
}

func (s *KubeSource) Pods() []*corev1.Pod {
	if s.pods == nil {
		return nil
	}
	pods, _ := s.pods.List(everything)
	return pods
}

func (s *KubeSource) Namespace(name string) (*corev1.Namespace, bool) {
	if s.nss == nil {
		return nil, false
	}
	n, err := s.nss.Get(name)
	return n, err == nil
}

var everything = labels.Everything()

func (s *KubeSource) Namespaces() []*corev1.Namespace {
	if s.nss == nil {
		return nil
	}
	nss, _ := s.nss.List(everything)
	return nss
}
