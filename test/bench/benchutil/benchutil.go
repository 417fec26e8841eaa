// Package benchutil holds what Sluice's benchmark programs share: reading the machine's
// CPU time (to notice and report other processes' noise) and writing the report.
package benchutil

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// ClockTick is USER_HZ, the unit of /proc/stat, which is 100 on every Linux ABI Go runs on.
const ClockTick = 10 * time.Millisecond

// MachineCPU reads the CPU time of all CPUs from /proc/stat: busy (everything but idle
// and iowait) and total.
func MachineCPU() (busy, total time.Duration, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	fields := strings.Fields(line)
	if len(fields) < 8 || fields[0] != "cpu" {
		return 0, 0, fmt.Errorf("unexpected /proc/stat line %q", line)
	}
	// user nice system idle iowait irq softirq steal ...
	for i, f := range fields[1:min(len(fields), 9)] {
		v, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("parse /proc/stat: %w", err)
		}
		d := time.Duration(v) * ClockTick
		total += d
		if i != 3 && i != 4 { // idle, iowait
			busy += d
		}
	}
	return busy, total, nil
}

// WriteReport writes report to out ("-" for standard output), creating its directory.
func WriteReport(out, report string, log *slog.Logger, started time.Time) error {
	if out == "-" {
		_, err := os.Stdout.WriteString(report)
		return err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(out, []byte(report), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	log.Info("report written", "path", out, "took", time.Since(started).Round(time.Second))
	return nil
}
