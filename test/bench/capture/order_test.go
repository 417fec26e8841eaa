//go:build linux

package main

import "testing"

// Every round must measure every mode exactly once, and with an even number of modes each
// mode must follow every other mode equally often, so that no mode always inherits the
// teardown of the same predecessor.
func TestOrderIsBalanced(t *testing.T) {
	for n := 1; n <= 8; n++ {
		follows := map[[2]int]int{}
		for r := range n {
			seen := map[int]bool{}
			prev := -1
			for i := range n {
				m := order(n, r, i)
				if m < 0 || m >= n || seen[m] {
					t.Fatalf("n=%d round %d: position %d gives mode %d (seen: %v); want a permutation", n, r, i, m, seen)
				}
				seen[m] = true
				if prev >= 0 {
					follows[[2]int{prev, m}]++
				}
				prev = m
			}
		}
		if n%2 != 0 {
			continue
		}
		for a := range n {
			for b := range n {
				if a != b && follows[[2]int{a, b}] != 1 {
					t.Errorf("n=%d: mode %d follows mode %d %d times in %d rounds, want once", n, b, a, follows[[2]int{a, b}], n)
				}
			}
		}
	}
}
