//go:build linux

package main

import (
	"slices"
	"testing"
)

func TestHoldPlanAddsTheMostThatFit(t *testing.T) {
	for _, tc := range []struct {
		name      string
		holds     []int
		limit     uint64
		want      []int
		wantExtra int
	}{
		{"everything fits", []int{2000, 10000}, 1 << 18, []int{2000, 10000}, 0},
		{"10,000 does not fit 20,000 descriptors", []int{2000, 10000}, 20000, []int{2000, 9500, 10000}, 9500},
		{"unsorted and repeated", []int{10000, 2000, 2000}, 20000, []int{2000, 9500, 10000}, 9500},
		{"already asked for", []int{9500, 10000}, 20000, []int{9500, 10000}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &bench{opts: options{holds: tc.holds}, fileLimit: tc.limit}
			got, extra := b.holdPlan()
			if !slices.Equal(got, tc.want) {
				t.Errorf("steps %v, want %v", got, tc.want)
			}
			if tc.wantExtra == 0 && len(extra) != 0 || tc.wantExtra != 0 && (!extra[tc.wantExtra] || len(extra) != 1) {
				t.Errorf("extra %v, want %d", extra, tc.wantExtra)
			}
		})
	}
}

func TestStatIsTheMedianWithItsRange(t *testing.T) {
	for _, tc := range []struct {
		in          []float64
		med, lo, hi float64
	}{
		{[]float64{3, 1, 2}, 2, 1, 3},
		{[]float64{4, 1, 3, 2}, 2.5, 1, 4},
		{[]float64{7}, 7, 7, 7},
	} {
		s := statOf(tc.in)
		if s.med != tc.med || s.lo != tc.lo || s.hi != tc.hi || s.n != len(tc.in) {
			t.Errorf("statOf(%v) = %+v, want median %v in %v–%v", tc.in, s, tc.med, tc.lo, tc.hi)
		}
	}
}
