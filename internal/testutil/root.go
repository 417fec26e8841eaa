// Package testutil holds the few helpers every kernel-facing test needs, so that they
// behave the same everywhere.
package testutil

import (
	"os"
	"testing"
)

// RequireRoot skips a test that needs root (network namespaces, BPF, cgroups) when run
// without it, but fails it in CI (CI=true), where a skip would make green mean "not
// tested".
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root (network namespaces, BPF, cgroups), and CI runs as root: run it as root")
	}
	t.Skip("needs root (network namespaces, BPF, cgroups)")
}
