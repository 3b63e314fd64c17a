package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/jobs"
)

// TestProgressLine: the progress counts results by status (a non-zero
// return code is not hidden behind "errors 0") and says what the others
// wait for.
func TestProgressLine(t *testing.T) {
	sum := newSummary()
	for _, r := range []jobs.Result{
		{Status: jobs.StatusCompleted}, {Status: jobs.StatusCompleted, ReturnCode: 2},
		{Status: jobs.StatusTimeout, ReturnCode: 124}, {Status: jobs.StatusError, ReturnCode: 1},
	} {
		sum.add(r)
	}
	var out bytes.Buffer
	p := newProgress(&out, 20, sum)
	start := p.start
	p.now = func() time.Time { return start.Add(11 * time.Second) }
	p.setWaits(jobs.WaitCounts{Running: 4, Capacity: 6, Turn: 2, Worker: 1})
	p.draw() // not a terminal: a line, 10 s after the last
	got := out.String()
	for _, want := range []string{"progress: 4/20", "completed 2 (1 rc≠0), timeout 1, error 1",
		"4 running, 6 wait for capacity, 2 wait for their task's turn, 1 wait for a worker", "11s"} {
		if !strings.Contains(got, want) {
			t.Errorf("progress line %q lacks %q", got, want)
		}
	}
	p.tty = true
	if got := p.line(); !strings.Contains(got, "4 run, wait: 6 capacity, 2 turn, 1 worker") || !strings.HasPrefix(got, "[##") {
		t.Errorf("bar %q: want the bar and the short wait counts", got)
	}
}

// TestSummaryPercentiles: p50 and p90 are nearest-rank percentiles: the
// smallest duration that at least that share of the commands did not
// exceed.
func TestSummaryPercentiles(t *testing.T) {
	tests := []struct {
		n        int
		p50, p90 time.Duration
	}{
		{1, 1 * time.Second, 1 * time.Second},
		{7, 4 * time.Second, 7 * time.Second}, // 6 of 7 is 86 %, short of 90
		{10, 5 * time.Second, 9 * time.Second},
		{20, 10 * time.Second, 18 * time.Second},
	}
	for _, tt := range tests {
		sum := newSummary()
		for i := tt.n; i >= 1; i-- {
			sum.add(jobs.Result{Status: jobs.StatusCompleted, StartedAt: time.Unix(1, 0), DurationMs: int64(i) * 1000})
		}
		if p50, p90 := sum.percentile(.5), sum.percentile(.9); p50 != tt.p50 || p90 != tt.p90 {
			t.Errorf("durations 1..%d s: p50 %v, p90 %v; want %v, %v", tt.n, p50, p90, tt.p50, tt.p90)
		}
	}
}
