package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/internal/syncbuf"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

// liveStack is a real redis-server, the reference gateway and a worker,
// for the modes that need a running boxq.
type liveStack struct {
	redisURL string
	prod     *jobs.Producer
}

func startLive(t *testing.T) *liveStack {
	t.Helper()
	srv := redistest.StartServer(t)
	rdb, url := srv.New(t)
	gw, err := local.New(local.Config{Token: "fan-token", Isolation: local.IsolationNone, MaxSandboxes: 300})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(gw.Handler())
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		err := app.RunWorker(ctx, app.WorkerOptions{RedisURL: url, GatewayURL: hs.URL, Token: "fan-token",
			Concurrency: 64, IdleTTL: time.Hour, ReapEvery: 300 * time.Millisecond, ShutdownTimeout: time.Second,
			OnReady: func(string) { close(ready) }})
		if err != nil && ctx.Err() == nil {
			t.Errorf("worker: %v", err)
		}
	})
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		hs.Close()
		cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer ccancel()
		_ = gw.Close(cctx)
	})
	select {
	case <-ready:
	case <-time.After(30 * time.Second):
		t.Fatal("worker not ready")
	}
	prod, err := jobs.NewProducer(rdb, jobs.ProducerConfig{Sweep: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return &liveStack{redisURL: url, prod: prod}
}

// runJobs runs jobs to their results.
func (s *liveStack) runJobs(t *testing.T, js []jobs.Job) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	w, err := s.prod.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for _, j := range js {
		e, err := s.prod.Enqueue(ctx, j, w.Channel())
		if err != nil {
			t.Fatal(err)
		}
		w.Add(e)
	}
	for w.Pending() > 0 {
		if r, err := w.Next(ctx); err != nil || r.Status != jobs.StatusCompleted {
			t.Fatalf("result %+v, err %v", r, err)
		}
	}
}

func (s *liveStack) enqueue(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, errb bytes.Buffer
	err := run(ctx, append([]string{"-redis", s.redisURL}, args...), noenv, strings.NewReader(""), &out, &errb)
	var ee *app.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.Code
	default:
		t.Fatalf("enqueue %q: %v; stderr:\n%s", args, err, errb.String())
	}
	return out.String(), errb.String(), code
}

// TestFanOut: 200 live tasks, 50 of them eval-42/*: a fan-out by glob and
// by file runs the command in those 50 only, and its summary counts them
// and groups identical outputs, dshbak -c style.
func TestFanOut(t *testing.T) {
	s := startLive(t)
	var js []jobs.Job
	for i := range 50 {
		js = append(js, jobs.Job{TaskID: fmt.Sprintf("eval-42/%d", i), Command: fmt.Sprintf("echo %d > ~/n", i)})
	}
	for i := range 150 {
		js = append(js, jobs.Job{TaskID: fmt.Sprintf("other/%d", i), Command: "echo other > ~/n"})
	}
	s.runJobs(t, js)

	const cmd = `n=$(cat ~/n); if [ $((n % 10)) = 2 ]; then echo two; exit 3; fi; echo ok`
	const wantSummary = `50 tasks: 50 completed (rc 0: 45, rc 3: 5)

eval-42/0-1,eval-42/3-11,eval-42/13-21,eval-42/23-31,eval-42/33-41,eval-42/43-49 (45 tasks), rc 0:
    ok

eval-42/2,eval-42/12,eval-42/22,eval-42/32,eval-42/42 (5 tasks), rc 3:
    two
`
	list := filepath.Join(t.TempDir(), "tasks")
	var ids strings.Builder
	for i := range 50 {
		fmt.Fprintf(&ids, "eval-42/%d\n", i)
	}
	if err := os.WriteFile(list, []byte(ids.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, by := range [][]string{{"-tasks", "eval-42/*"}, {"-tasks-file", list}} {
		t.Run(by[0], func(t *testing.T) {
			out, errb, code := s.enqueue(t, append(by, "-wait", "--", cmd)...)
			if code != 1 {
				t.Errorf("exit %d, want 1 (some commands failed); stderr:\n%s", code, errb)
			}
			lines, summary, ok := strings.Cut(out, "\n\n")
			if !ok || summary != wantSummary {
				t.Errorf("summary:\n%s\nwant:\n%s", summary, wantSummary)
			}
			if n := strings.Count(lines, "\n") + 1; n != 50 || strings.Contains(lines, "other/") {
				t.Errorf("%d result lines, want 50 of eval-42/*:\n%s", n, lines)
			}
		})
	}

	out, _, code := s.enqueue(t, "-tasks", "eval-42/1*", "-wait", "-json", "--", "echo same")
	if code != 0 {
		t.Errorf("-json fan-out exit %d", code)
	}
	if n := strings.Count(out, "\n"); n != 11 {
		t.Errorf("-json: %d lines, want 11 results (eval-42/1, 10-19)", n)
	}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var r jobs.Result
		if err := json.Unmarshal([]byte(l), &r); err != nil || r.Output != "same\n" {
			t.Errorf("-json line %q: %+v, %v", l, r, err)
		}
	}

	_, errb, code := s.enqueue(t, "-tasks", "eval-43/*", "--", "true")
	if code != 1 || !strings.Contains(errb, "no task matches 'eval-43/*'") {
		t.Errorf("no match: exit %d, stderr %q; want 1 and a message", code, errb)
	}
}

// TestNightlyCleanup is the README's scheduled cleanup, end to end: a
// -terminate -tasks '**' schedule ends every live sandbox at its tick,
// -schedules shows the run, and a fan-out terminate does the same at once.
func TestNightlyCleanup(t *testing.T) {
	s := startLive(t)
	var js []jobs.Job
	for i := range 6 {
		js = append(js, jobs.Job{TaskID: fmt.Sprintf("eval-7/%d", i), Command: "true"})
	}
	js = append(js, jobs.Job{TaskID: "scratch", Command: "true"})
	s.runJobs(t, js)

	if _, errb, code := s.enqueue(t, "-schedule", "nightly-cleanup", "-cron", "0 3 * * *", "-tz", "Europe/Paris", "-terminate", "-tasks", "**"); code != 0 {
		t.Fatalf("-schedule: exit %d: %s", code, errb)
	}
	// The README's schedule runs at 03:00; this one every second, to see it run.
	if _, errb, code := s.enqueue(t, "-schedule", "nightly-cleanup", "-cron", "@every 1s", "-terminate", "-tasks", "**"); code != 0 {
		t.Fatalf("-schedule: exit %d: %s", code, errb)
	}
	ctx := context.Background()
	deadline := time.Now().Add(20 * time.Second)
	for {
		tasks, err := s.prod.MatchTasks(ctx, "**")
		if err != nil {
			t.Fatal(err)
		}
		if len(tasks) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cleanup schedule left %q", tasks)
		}
		time.Sleep(100 * time.Millisecond)
	}
	out, _, _ := s.enqueue(t, "-schedules")
	t.Logf("-schedules:\n%s", out)
	if !strings.Contains(out, "nightly-cleanup") || !strings.Contains(out, "terminate -tasks '**'") || !strings.Contains(out, "Z: ") {
		t.Errorf("-schedules:\n%s", out)
	}
	// The README's job-file schedule.
	if _, errb, code := s.enqueue(t, "-schedule", "report", "-cron", "@daily", "-f", "../../examples/nightly-report.json"); code != 0 {
		t.Fatalf("-schedule -f: exit %d: %s", code, errb)
	}
	if out, _, _ := s.enqueue(t, "-schedules"); !strings.Contains(out, "-task reports -- mkdir") {
		t.Errorf("-schedules lacks the job-file schedule:\n%s", out)
	}
	if _, errb, code := s.enqueue(t, "-unschedule", "report"); code != 0 {
		t.Fatalf("-unschedule: exit %d: %s", code, errb)
	}
	if _, errb, code := s.enqueue(t, "-unschedule", "nightly-cleanup"); code != 0 {
		t.Fatalf("-unschedule: exit %d: %s", code, errb)
	}
	if out, _, _ := s.enqueue(t, "-schedules"); !strings.Contains(out, "no schedules") {
		t.Errorf("-schedules after -unschedule:\n%s", out)
	}

	// At once, from the command line.
	s.runJobs(t, js)
	out, errb, code := s.enqueue(t, "-terminate", "-tasks", "eval-7/*")
	if code != 0 || out != "eval-7/0-5 (6 tasks): terminated\n" {
		t.Errorf("-terminate -tasks: exit %d, stdout %q, stderr %q", code, out, errb)
	}
	if tasks, _ := s.prod.MatchTasks(ctx, "**"); len(tasks) != 1 || tasks[0] != "scratch" {
		t.Errorf("left after -terminate -tasks eval-7/*: %q, want scratch", tasks)
	}
}

func TestSchedulingUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"-schedule", "x", "-task", "t", "--", "true"}, "-schedule needs -cron"},
		{[]string{"-schedule", "x", "-cron", "bad", "-task", "t", "--", "true"}, "cron spec"},
		{[]string{"-schedule", "x", "-cron", "@daily", "-tz", "Nowhere/City", "-task", "t", "--", "true"}, "unknown time zone"},
		{[]string{"-tasks", "a", "-tasks-file", "b", "--", "true"}, "use one"},
		{[]string{"-tasks", "a"}, "missing command"},
		{[]string{"-in", "1m", "-at", "2030-01-01T00:00:00Z", "-task", "t", "--", "true"}, "use one"},
		{[]string{"-at", "tomorrow", "-task", "t", "--", "true"}, "RFC 3339"},
		{[]string{"-cron", "@daily", "-task", "t", "--", "true"}, "go with -schedule"},
		{[]string{"-in", "1m", "-f", "x"}, "run_at"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		err := run(context.Background(), append([]string{"-redis", "redis://127.0.0.1:1/0"}, tt.args...), noenv, strings.NewReader(""), &out, &errb)
		var ue *app.UsageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("run(%q) = %v, want a usage error containing %q", tt.args, err, tt.want)
		}
	}
}

// TestFanOutWaitWarnsAndNamesOutstanding: a fan-out's -wait keeps the
// user told, as a batch's does: it warns when no live worker serves the
// jobs' queue, and, interrupted, names the jobs without a result.
func TestFanOutWaitWarnsAndNamesOutstanding(t *testing.T) {
	s := startLive(t)
	s.runJobs(t, []jobs.Job{{TaskID: "fo/1", Command: "true"}, {TaskID: "fo/2", Command: "true"}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, errb syncbuf.Buffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-redis", s.redisURL, "-tasks", "fo/*", "-queue", "nobody", "-wait", "--", "true"}, noenv, strings.NewReader(""), &out, &errb)
	}()
	deadline := time.After(30 * time.Second)
	for !strings.Contains(errb.String(), `no live worker serves queue "nobody"`) {
		select {
		case err := <-done:
			t.Fatalf("fan-out ended: %v; stderr:\n%s", err, errb.String())
		case <-deadline:
			t.Fatalf("no warning that no worker serves queue nobody; stderr:\n%s", errb.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
	cancel()
	err := <-done
	if err == nil || !strings.Contains(err.Error(), "2 jobs have no result yet") {
		t.Errorf("interrupted: %v, want the count of jobs without a result", err)
	}
	if n := strings.Count(errb.String(), "\n"); n < 3 {
		t.Errorf("interrupted: the outstanding ids are not named; stderr:\n%s", errb.String())
	}
}

// TestFanOutTerminateWait: -terminate -tasks -wait waits until every
// terminate is done, as -terminate -task -wait does, not terminateWait.
func TestFanOutTerminateWait(t *testing.T) {
	s := startLive(t)
	s.runJobs(t, []jobs.Job{{TaskID: "tw/1", Command: "true"}, {TaskID: "tw/2", Command: "true"}})
	defer func(d time.Duration) { terminateWait = d }(terminateWait)
	terminateWait = time.Nanosecond // what a wait without -wait would give up after
	out, errb, code := s.enqueue(t, "-terminate", "-tasks", "tw/*", "-wait")
	if code != 0 || out != "tw/1-2 (2 tasks): terminated\n" {
		t.Errorf("-terminate -tasks -wait: exit %d, stdout %q, stderr %q; want both terminated", code, out, errb)
	}
}

// TestFanOutTerminateWarnsNoWorker: -terminate -tasks with no worker
// running says so after a few seconds, as -terminate -task does, rather
// than waiting silently.
func TestFanOutTerminateWarnsNoWorker(t *testing.T) {
	srv := redistest.StartServer(t)
	rdb, url := srv.New(t)
	gw, err := local.New(local.Config{Token: "fan-token", Isolation: local.IsolationNone})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(gw.Handler())
	t.Cleanup(func() {
		hs.Close()
		cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer ccancel()
		_ = gw.Close(cctx)
	})
	client, err := gateway.New(gateway.Config{BaseURL: hs.URL, Token: "fan-token"})
	if err != nil {
		t.Fatal(err)
	}
	pool, err := sandboxpool.New(rdb, client, sandboxpool.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// A sandbox for task nw/1, and no worker.
	l, err := pool.Acquire(ctx, "nw/1", sandboxpool.Spec{}, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := pool.Release(ctx, l, ""); err != nil {
		t.Fatal(err)
	}
	var out, errb syncbuf.Buffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-redis", url, "-terminate", "-tasks", "nw/*"}, noenv, strings.NewReader(""), &out, &errb)
	}()
	deadline := time.After(30 * time.Second)
	for !strings.Contains(errb.String(), "no live worker") {
		select {
		case err := <-done:
			t.Fatalf("ended: %v; stdout %q, stderr %q", err, out.String(), errb.String())
		case <-deadline:
			t.Fatalf("no warning that no worker runs; stderr %q", errb.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
	cancel()
	<-done
}
