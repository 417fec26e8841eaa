//go:build linux

package cmd

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/sluicemesh/sluice/test/lab"
)

// sample is one line of Prometheus text exposition.
type sample struct {
	line   string
	name   string
	labels map[string]string
	value  float64
}

// scrapeAgent reads node n's agent metrics.
func scrapeAgent(ctx context.Context, n lab.Node) ([]sample, error) {
	body, err := getInNode(ctx, n, agentMetricsAddr, "/metrics")
	if err != nil {
		return nil, fmt.Errorf("scrape the agent on %s: %w (see %s)", n.Name, err, pathsOf(n).agentLog)
	}
	return parseMetrics(bytes.NewReader(body))
}

// getInNode fetches http://addr+path from inside node n's network namespace, where the
// agent's and ztunnel's loopback listeners are. http.Transport dials on goroutines of its
// own, hence the dial function rather than Node.Do around http.Get.
func getInNode(ctx context.Context, n lab.Node, addr, path string) ([]byte, error) {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return n.Dial(ctx, "tcp", addr)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s%s on %s: %s", addr, path, n.Name, resp.Status)
	}
	return io.ReadAll(io.LimitReader(resp.Body, 16<<20))
}

// parseMetrics reads the text format well enough for the agent's own metrics: no
// escaped quotes or commas inside label values.
func parseMetrics(r io.Reader) ([]sample, error) {
	var out []sample
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		s := sample{line: line, value: v, labels: map[string]string{}}
		series := line[:i]
		name, labels, hasLabels := strings.Cut(series, "{")
		s.name = name
		if hasLabels {
			for kv := range strings.SplitSeq(strings.TrimSuffix(labels, "}"), ",") {
				if k, v, ok := strings.Cut(kv, "="); ok {
					s.labels[k] = strings.Trim(v, `"`)
				}
			}
		}
		out = append(out, s)
	}
	return out, sc.Err()
}

// enrolledPods is the agent's sluice_agent_enrolled_pods.
func enrolledPods(ctx context.Context, n lab.Node) (int, error) {
	samples, err := scrapeAgent(ctx, n)
	if err != nil {
		return 0, err
	}
	for _, s := range samples {
		if s.name == "sluice_agent_enrolled_pods" {
			return int(s.value), nil
		}
	}
	return 0, fmt.Errorf("the agent on %s reports no sluice_agent_enrolled_pods", n.Name)
}

func metricKey(pod, direction string) string { return pod + " " + direction }

// showMetrics prints every non-zero sluice_pod_tcp_* sample of the ambient namespace's
// pods and checks that connections_opened_total reached wantOpened (by metricKey).
func (d *demo) showMetrics(ctx context.Context, wantOpened map[string]uint64) {
	opened := map[string]uint64{}
	for _, n := range d.l.Nodes() {
		samples, err := scrapeAgent(ctx, n)
		if err != nil {
			d.fail(err.Error())
			continue
		}
		fmt.Fprintf(d.out, "\n   %s:\n", n.Name)
		for _, s := range samples {
			if s.name == "sluice_agent_enrolled_pods" {
				fmt.Fprintf(d.out, "     %s\n", s.line)
			}
		}
		for _, s := range samples {
			if !strings.HasPrefix(s.name, "sluice_pod_tcp_") || s.labels["namespace"] != demoAmbientNS {
				continue
			}
			if s.name == "sluice_pod_tcp_connections_opened_total" {
				opened[metricKey(s.labels["pod"], s.labels["direction"])] += uint64(s.value)
			}
			if s.value != 0 {
				fmt.Fprintf(d.out, "     %s\n", s.line)
			}
		}
	}
	fmt.Fprintf(d.out, "   (samples that are zero are left out)\n")
	for k, want := range wantOpened {
		if opened[k] < want {
			d.fail(fmt.Sprintf("sluice_pod_tcp_connections_opened_total for %s/%s is %d, want at least %d", demoAmbientNS, k, opened[k], want))
		}
	}
}
