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
