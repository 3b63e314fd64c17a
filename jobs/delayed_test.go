package jobs_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/jobs"
)

// TestDelayedJobRunsAtItsTime: a job delayed by 2 s (enqueue -in 2s) is
// listed as scheduled with its time until then, and starts no earlier.
func TestDelayedJobRunsAtItsTime(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	runAt := time.Now().Add(2 * time.Second)
	w, e := s.submit(t, ctx, jobs.Job{ID: "delayed", TaskID: "dl", Command: "date +%s.%N", RunAt: &runAt})
	_, state, ok, err := s.prod.Lookup(ctx, e.ID)
	if err != nil || ok {
		t.Fatalf("Lookup before its time: ok %v, err %v", ok, err)
	}
	if want := "scheduled: runs at " + runAt.UTC().Format(time.RFC3339Nano); state != want {
		t.Errorf("state before its time: got %q, want %q", state, want)
	}
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCompleted {
		t.Fatalf("result %+v", r)
	}
	ranAt := parseUnix(t, r.Output)
	if ranAt.Before(runAt) || r.StartedAt.Before(runAt) {
		t.Errorf("the command ran at %v (started %v), before its run_at %v", ranAt, r.StartedAt, runAt)
	}
}

// TestDelayedJobCancelledNeverRuns: cancelled before its time, a delayed
// job ends "cancelled" at once, and its command never runs.
func TestDelayedJobCancelledNeverRuns(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	runAt := time.Now().Add(2 * time.Second)
	w, e := s.submit(t, ctx, jobs.Job{ID: "delayed-cancel", TaskID: "dlc", Command: "touch ~/ran", RunAt: &runAt})
	if err := s.prod.Cancel(ctx, e.ID); err != nil {
		t.Fatalf("Cancel: %v", err)
	}
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCancelled || r.ReturnCode != 130 {
		t.Errorf("result %+v, want cancelled/130", r)
	}
	// Past its time: a later command of the task finds no trace of it.
	time.Sleep(time.Until(runAt.Add(500 * time.Millisecond)))
	if r2 := s.run1(t, jobs.Job{TaskID: "dlc", Command: "ls ~/ran 2>&1 || echo absent"}); !strings.Contains(r2.Output, "absent") {
		t.Errorf("the cancelled delayed job ran: %q", r2.Output)
	}
}

// TestDelayedJobJoinsItsSequenceWhenDue: a delayed job does not hold back
// its task's later jobs while it waits; when it falls due behind a running
// command of its task, it waits for its turn, and jobs enqueued after it
// fell due run after it.
func TestDelayedJobJoinsItsSequenceWhenDue(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	runAt := time.Now().Add(2 * time.Second)
	wd, _ := s.submit(t, ctx, jobs.Job{ID: "d", TaskID: "dseq", Command: "echo d >> ~/order", RunAt: &runAt})
	// Enqueued after the delayed job, due before it: not held back.
	ra := s.run1(t, jobs.Job{ID: "a", TaskID: "dseq", Command: "echo a >> ~/order"})
	if !ra.FinishedAt.Before(runAt) {
		t.Fatalf("job a finished at %v, not before the delayed job's time %v: held back?", ra.FinishedAt, runAt)
	}
	wb, _ := s.submit(t, ctx, jobs.Job{ID: "b", TaskID: "dseq", Command: "sleep 3; echo b >> ~/order"})
	// d falls due while b runs: it waits for its turn.
	waitFor(t, 10*time.Second, "the delayed job to wait for its turn", func() bool {
		_, state, _, err := s.prod.Lookup(ctx, "d")
		return err == nil && strings.HasPrefix(state, "waiting for its turn")
	})
	wc, _ := s.submit(t, ctx, jobs.Job{ID: "c", TaskID: "dseq", Command: "echo c >> ~/order"})
	for _, w := range []*jobs.Waiter{wb, wd, wc} {
		if r, err := w.Next(ctx); err != nil || r.Status != jobs.StatusCompleted {
			t.Fatalf("result %+v, err %v", r, err)
		}
	}
	if r := s.run1(t, jobs.Job{TaskID: "dseq", Command: "cat ~/order"}); r.Output != "a\nb\nd\nc\n" {
		t.Errorf("order: got %q, want a b d c", r.Output)
	}
}

func parseUnix(t *testing.T, s string) time.Time {
	t.Helper()
	var sec, nsec int64
	if _, err := fmt.Sscanf(strings.TrimSpace(s), "%d.%d", &sec, &nsec); err != nil {
		t.Fatalf("parse %q: %v", s, err)
	}
	return time.Unix(sec, nsec)
}

func TestParseJobRunAt(t *testing.T) {
	j, err := jobs.ParseJob([]byte(`{"task_id": "t", "command": "true", "run_at": "2026-12-03T03:00:00Z"}`))
	if err != nil || j.RunAt == nil || !j.RunAt.Equal(time.Date(2026, 12, 3, 3, 0, 0, 0, time.UTC)) {
		t.Errorf("ParseJob with run_at = %+v, %v", j, err)
	}
	for line, want := range map[string]string{
		`{"task_id": "t", "command": "true", "run_at": "tomorrow"}`:             "run_at",
		`{"task_id": "t", "command": "true", "run_at": "2300-01-01T00:00:00Z"}`: "too far ahead",
	} {
		if _, err := jobs.ParseJob([]byte(line)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseJob(%s) = %v, want an error with %q", line, err, want)
		}
	}
}
