package jobs_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/boxq/boxq/internal/syncbuf"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

// TestMetricsKeepWaitsApart: a job waiting for its task's turn (the lease
// held elsewhere) is boxq's own wait, counted in boxq_waits_total{turn} and
// never as a gateway error; a job refused by a full gateway (429) is a
// gateway answer and a wait for capacity; the queue wait is observed once
// per job however often it came back; boxq_sandboxes_live counts the
// sandboxes the gateway made, not the refused create's record.
func TestMetricsKeepWaitsApart(t *testing.T) {
	s := newStack(t, stackOptions{maxSandboxes: 1})
	reg := prometheus.NewRegistry()
	m, err := jobs.NewMetrics(reg, s.pool.Created, nil)
	if err != nil {
		t.Fatal(err)
	}
	var logs syncbuf.Buffer
	s.startWorker(t, func(c *jobs.WorkerConfig) {
		c.Metrics = m
		c.Logger = slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	if r := s.run1(t, jobs.Job{TaskID: "ta", Command: "true"}); r.Status != jobs.StatusCompleted {
		t.Fatalf("first job: %+v", r)
	}
	// The gateway holds its one sandbox: task tb's create gets a 429.
	_, refused := s.submit(t, ctx, jobs.Job{ID: "tb-" + randID(), TaskID: "tb", Command: "true"})
	waitFor(t, 20*time.Second, "a capacity wait", func() bool { return value(t, reg, "boxq_waits_total", "gateway_capacity") >= 1 })
	// The worker says so at info, in the gateway's words, once per
	// CapacityLogEvery however often the job came back.
	if got := logs.String(); !strings.Contains(got, "jobs wait for capacity") || !strings.Contains(got, "429") {
		t.Errorf("no info line about the capacity wait with the gateway's answer:\n%s", got)
	}
	if err := s.prod.Cancel(ctx, refused.ID); err != nil {
		t.Fatal(err)
	}
	if got := value(t, reg, "boxq_sandboxes_live", ""); got != 1 {
		t.Errorf("boxq_sandboxes_live = %v with a refused create pending; want 1", got)
	}

	// Task ta's lease held elsewhere: its next job waits for its turn.
	l, err := s.pool.Acquire(ctx, "ta", sandboxpool.Spec{}, "")
	if err != nil {
		t.Fatal(err)
	}
	w, held := s.submit(t, ctx, jobs.Job{ID: "held-" + randID(), TaskID: "ta", Command: "true"})
	waitFor(t, 20*time.Second, "a turn wait", func() bool { return value(t, reg, "boxq_waits_total", "turn") >= 1 })
	if err := s.pool.Release(ctx, l, ""); err != nil {
		t.Fatal(err)
	}
	if r := waitResult(t, ctx, w); r.ID != held.ID || r.Status != jobs.StatusCompleted {
		t.Fatalf("the held job: %+v", r)
	}

	if gw, waits := value(t, reg, "boxq_gateway_errors_total", "capacity"), value(t, reg, "boxq_waits_total", "gateway_capacity"); gw != waits {
		t.Errorf("boxq_gateway_errors_total{capacity} = %v, boxq_waits_total{gateway_capacity} = %v: the gateway's 429s only, so equal (turn waits are not gateway errors)", gw, waits)
	}
	if got := value(t, reg, "boxq_queue_wait_seconds", ""); got != 2 {
		t.Errorf("boxq_queue_wait_seconds count = %v; want 2, once per job that ran (the held one came back several times)", got)
	}
}

// value returns a sample of reg: a counter or gauge (with label value
// label, "" for none), or a histogram's count.
func value(t *testing.T, reg *prometheus.Registry, name, label string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, mt := range mf.GetMetric() {
			found := label == ""
			for _, l := range mt.GetLabel() {
				found = found || l.GetValue() == label
			}
			if !found {
				continue
			}
			switch {
			case mt.Counter != nil:
				return mt.Counter.GetValue()
			case mt.Gauge != nil:
				return mt.Gauge.GetValue()
			case mt.Histogram != nil:
				return float64(mt.Histogram.GetSampleCount())
			}
		}
	}
	return 0
}
