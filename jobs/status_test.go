package jobs_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/jobs"
)

// TestStatusSaysWhatAJobWaitsFor: a job with no worker waits for a worker,
// the next job of its task waits for its turn behind it, a job refused by
// a full gateway waits for capacity with the gateway's words, and a
// finished job is done with its result. The Waiter's counts agree.
func TestStatusSaysWhatAJobWaitsFor(t *testing.T) {
	s := newStack(t, stackOptions{maxSandboxes: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	status := func(id string) jobs.JobStatus {
		t.Helper()
		st, err := s.prod.Status(ctx, id)
		if err != nil {
			t.Fatalf("Status(%s): %v", id, err)
		}
		return st
	}

	if _, err := s.prod.Status(ctx, "no-such-job"); !errors.Is(err, jobs.ErrJobNotFound) {
		t.Errorf("Status of an unknown job: %v; want ErrJobNotFound", err)
	}

	w, first := s.submit(t, ctx, jobs.Job{ID: "first-" + randID(), TaskID: "t1", Command: "echo one"})
	_, second := s.submit(t, ctx, jobs.Job{ID: "second-" + randID(), TaskID: "t1", Command: "echo two"})
	if st := status(first.ID); st.State != jobs.StatePending || st.WaitingFor != jobs.WaitWorker {
		t.Errorf("first job with no worker: %+v; want pending for a worker", st)
	}
	st := status(second.ID)
	if st.State != jobs.StateWaiting || st.WaitingFor != jobs.WaitTurn || st.Behind != first.ID || st.Ahead != 1 {
		t.Errorf("second job of the task: %+v; want waiting for its turn behind %s", st, first.ID)
	}
	if !strings.Contains(st.String(), first.ID) {
		t.Errorf("String() = %q; want it to name the job ahead", st.String())
	}
	waitFor(t, 10*time.Second, "the waiter's first sweep", func() bool {
		nudge(w)
		c := w.Counts()
		return c.Worker == 1 && c.Turn == 0 // w waits for the first job only
	})

	s.startWorker(t, nil)
	if r := waitResult(t, ctx, w); r.ID != first.ID || r.Status != jobs.StatusCompleted {
		t.Fatalf("first job: %+v", r)
	}
	if st := status(first.ID); st.State != jobs.StateDone || st.Result == nil || st.Result.Output != "one\n" {
		t.Errorf("finished job: %+v; want done with its result", st)
	}

	// Task t1's sandbox fills the gateway (1 sandbox): another task's job
	// waits for capacity, and says so in the gateway's words.
	w3, third := s.submit(t, ctx, jobs.Job{ID: "third-" + randID(), TaskID: "t3", Command: "echo three"})
	waitFor(t, 20*time.Second, "the third job to wait for capacity", func() bool {
		return status(third.ID).WaitingFor == jobs.WaitCapacity
	})
	st = status(third.ID)
	if st.State != jobs.StateWaiting || !strings.Contains(st.LastError, "429") {
		t.Errorf("job refused by a full gateway: %+v; want waiting for capacity with the gateway's answer", st)
	}
	waitFor(t, 10*time.Second, "the waiter to count the capacity wait", func() bool {
		nudge(w3)
		return w3.Counts().Capacity == 1
	})
	if err := s.prod.Cancel(ctx, third.ID); err != nil {
		t.Fatal(err)
	}

	// A delayed job is scheduled, and says when it runs.
	at := time.Now().Add(time.Hour).Truncate(time.Second)
	_, later := s.submit(t, ctx, jobs.Job{ID: "later-" + randID(), TaskID: "t1", Command: "echo later", RunAt: &at})
	if st := status(later.ID); st.State != jobs.StateScheduled || st.WaitingFor != jobs.WaitSchedule || !st.NextRun.Equal(at) {
		t.Errorf("delayed job: %+v; want scheduled at %v", st, at)
	}
	if err := s.prod.Cancel(ctx, later.ID); err != nil {
		t.Fatal(err)
	}
}

// nudge lets w run its sweeps for a moment (they run inside Next), with
// no result expected.
func nudge(w *jobs.Waiter) {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, _ = w.Next(ctx)
}

func waitResult(t *testing.T, ctx context.Context, w *jobs.Waiter) jobs.Result {
	t.Helper()
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatalf("waiting for a result: %v", err)
	}
	return r
}
