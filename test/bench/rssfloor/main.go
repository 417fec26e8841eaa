// Command rssfloor measures the resident memory of the smallest Go process that does
// what every ztunnel must: serve Prometheus metrics over HTTP with client_golang. It is
// the floor under ztunnel's "RSS at rest" in docs/bench/ztunnel.md, built the way
// ztunnel is shipped:
//
//	CGO_ENABLED=0 go build -trimpath -o /tmp/rssfloor ./test/bench/rssfloor && /tmp/rssfloor
//
// It prints the process's Rss and its anonymous part after answering one scrape.
package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "rssfloor:", err)
		os.Exit(1)
	}
}

func run() error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opened := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total"}, []string{"reporter"})
	reg.MustRegister(opened)
	opened.WithLabelValues("destination").Inc()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	go http.Serve(ln, promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	resp, err := http.Get("http://" + ln.Addr().String() + "/metrics")
	if err != nil {
		return err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()

	b, err := os.ReadFile("/proc/self/smaps_rollup")
	if err != nil {
		return err
	}
	for line := range strings.Lines(string(b)) {
		if strings.HasPrefix(line, "Rss:") || strings.HasPrefix(line, "Anonymous:") {
			fmt.Print(line)
		}
	}
	return nil
}
