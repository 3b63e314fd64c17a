package jobs_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/jobs"
)

// idleWorker starts a worker that polls every poll when nothing wakes it,
// and waits until it is idle: waiting for a wake-up.
func (s *stack) idleWorker(t *testing.T, poll time.Duration) (*jobs.Worker, func()) {
	t.Helper()
	w, stop := s.startWorkerW(t, func(c *jobs.WorkerConfig) { c.TaskCheckInterval = poll })
	if jobs.IdleWaits(w) < 0 {
		t.Fatal("the worker has no wake-ups: it polls")
	}
	waitFor(t, 20*time.Second, "the worker to wait for a wake-up", func() bool { return jobs.IdleWaits(w) > 0 })
	return w, stop
}

// TestIdleWorkerWakesOnEnqueue: a worker that would poll Redis once in 10
// minutes picks up, at once, every way a job becomes runnable: an enqueue,
// a task's next command when the one before it ends (the sequence's
// hand-over), a delayed job falling due (asynq's forwarder), a terminate.
// Each ends well within the test's minute: only a wake-up explains that.
func TestIdleWorkerWakesOnEnqueue(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.idleWorker(t, 10*time.Minute)

	if r := s.run1(t, jobs.Job{TaskID: "wake", Command: "echo one"}); r.Status != jobs.StatusCompleted || r.Output != "one\n" {
		t.Fatalf("enqueued job: %+v", r)
	}

	// Three commands of one task: the second and third are parked behind
	// the first, and each is made runnable when the one before it ends.
	var chain []jobs.Job
	for i := range 3 {
		chain = append(chain, jobs.Job{ID: fmt.Sprintf("wake-chain-%d-%s", i, randID()), TaskID: "wake-chain", Command: fmt.Sprintf("sleep 0.2; echo %d", i)})
	}
	res := s.runJobs(t, 60*time.Second, chain...)
	for i, j := range chain {
		if r := res[j.ID]; r.Status != jobs.StatusCompleted || r.Output != fmt.Sprintf("%d\n", i) {
			t.Errorf("chained job %d: %+v", i, r)
		}
	}

	at := time.Now().Add(time.Second)
	if r := s.run1(t, jobs.Job{TaskID: "wake", Command: "echo later", RunAt: &at}); r.Status != jobs.StatusCompleted || r.Output != "later\n" {
		t.Errorf("delayed job: %+v", r)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	id, err := s.prod.Terminate(ctx, "wake", false)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "the terminate to run", func() bool {
		info, err := asynq.NewInspectorFromRedisClient(s.rdb).GetTaskInfo(jobs.MaintenanceQueue, id)
		return err == nil && info.State == asynq.TaskStateCompleted
	})
}

// TestIdleWorkerIsQuiet: an idle worker asks Redis for jobs once per poll
// interval, not in a loop: over 1.5 s at a 300 ms interval it begins at
// most 1.5/0.3 + 2 waits (a slow machine makes fewer, never more), and at
// least one (the safety net polls).
func TestIdleWorkerIsQuiet(t *testing.T) {
	s := newStack(t, stackOptions{})
	w, _ := s.idleWorker(t, 300*time.Millisecond)
	before := jobs.IdleWaits(w)
	time.Sleep(1500 * time.Millisecond)
	n := jobs.IdleWaits(w) - before
	t.Logf("%d idle rounds in 1.5 s at a 300 ms interval", n)
	if n < 1 || n > 7 {
		t.Errorf("%d idle rounds in 1.5 s at a 300 ms interval, want 1 to 7", n)
	}
}

// TestIdleWorkerStops: a worker waiting for a wake-up (10 minutes at most)
// stops at once when told to: stop fails the test after 30 s.
func TestIdleWorkerStops(t *testing.T) {
	s := newStack(t, stackOptions{})
	_, stop := s.idleWorker(t, 10*time.Minute)
	stop()
}

// TestWakeChannelInScripts: the channel the sequence scripts derive from
// their keys is the one workers listen on, for a queue name with the
// characters a queue's name may hold.
func TestWakeChannelInScripts(t *testing.T) {
	s := newStack(t, stackOptions{})
	const queue = "odd queue.2-x"
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sub := s.rdb.Subscribe(ctx, jobs.WakeChannel("boxq:", queue))
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	// The first job is runnable at once (the producer publishes); the
	// second is parked, and promoted (the script publishes) when the
	// first's result is written by a worker of that queue.
	first := jobs.Job{ID: "wq-1-" + randID(), TaskID: "wq", Command: "true", Queue: queue}
	second := jobs.Job{ID: "wq-2-" + randID(), TaskID: "wq", Command: "true", Queue: queue}
	s.startWorker(t, func(c *jobs.WorkerConfig) { c.Queues = map[string]int{queue: 1} })
	res := s.runJobs(t, 60*time.Second, first, second)
	for _, j := range []jobs.Job{first, second} {
		if r := res[j.ID]; r.Status != jobs.StatusCompleted {
			t.Fatalf("job %s: %+v", j.ID, r)
		}
	}
	heard := 0
	for heard < 2 {
		msg, err := sub.ReceiveTimeout(ctx, 10*time.Second)
		if err != nil {
			t.Fatalf("%d wake-ups heard on %q, want 2 (the enqueue's and the promote's): %v", heard, jobs.WakeChannel("boxq:", queue), err)
		}
		if _, ok := msg.(*redis.Message); ok {
			heard++
		}
	}
}

// TestWakeUpFloodIsBounded: wake-ups published as fast as one client can
// (as a fleet's producers would at thousands of jobs a second) let an idle
// worker through at most one dequeue round per 5 ms (wakeGap), and at
// least one: a flood costs Redis what asynq's 5 ms polling did, no more.
func TestWakeUpFloodIsBounded(t *testing.T) {
	s := newStack(t, stackOptions{})
	w, _ := s.idleWorker(t, 10*time.Minute)
	ctx := context.Background()
	before := jobs.WokenRounds(w)
	start := time.Now()
	sent := 0
	for time.Since(start) < time.Second {
		if err := s.rdb.Publish(ctx, jobs.WakeChannel("boxq:", jobs.DefaultQueue), "").Err(); err != nil {
			t.Fatal(err)
		}
		sent++
	}
	waitFor(t, 5*time.Second, "a round let through by a wake-up", func() bool { return jobs.WokenRounds(w) > before })
	n := jobs.WokenRounds(w) - before
	took := time.Since(start)
	most := int64(took/(5*time.Millisecond)) + 2
	t.Logf("%d wake-ups in %v let %d rounds through (at most %d)", sent, took.Round(time.Millisecond), n, most)
	if n < 1 || n > most {
		t.Errorf("%d rounds let through by %d wake-ups in %v, want 1 to %d", n, sent, took, most)
	}
}

// TestIdleWorkerWakesOnCancel: cancelling a delayed job brings it forward
// (asynq's RunTask) for a worker to end it with its cancelled result. An
// idle worker that would poll once in 10 minutes does so at once: the
// cancel wakes it.
func TestIdleWorkerWakesOnCancel(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.idleWorker(t, 10*time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	at := time.Now().Add(time.Hour)
	w, e := s.submit(t, ctx, jobs.Job{ID: "wake-cancel-" + randID(), TaskID: "wake-cancel", Command: "echo never", RunAt: &at})
	if err := s.prod.Cancel(ctx, e.ID); err != nil {
		t.Fatal(err)
	}
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatalf("no result for the cancelled delayed job within 30 s (a worker polling once in 10 minutes was not woken): %v", err)
	}
	if r.Status != jobs.StatusCancelled {
		t.Errorf("cancelled delayed job: %+v", r)
	}
}

// TestIdleWorkerTakesRequeuedJob: a job that a stopping worker hands back
// (asynq's requeue, after ShutdownTimeout) is taken at once by another
// idle worker that would poll once in 10 minutes, and finished there. Its
// rescuer is off, so only asynq's delivery can finish the job.
func TestIdleWorkerTakesRequeuedJob(t *testing.T) {
	s := newStack(t, stackOptions{})
	_, stopA := s.idleWorker(t, 10*time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	j := jobs.Job{ID: "wake-requeue-" + randID(), TaskID: "wake-requeue", Command: "sleep 6; echo done"}
	w, e := s.submit(t, ctx, j)
	waitFor(t, 20*time.Second, "the job to run on the first worker", func() bool {
		info, err := asynq.NewInspectorFromRedisClient(s.rdb).GetTaskInfo(e.Queue, e.ID)
		return err == nil && info.State == asynq.TaskStateActive
	})
	// The second worker is idle (the job is taken) before the first stops.
	s.startWorkerW(t, func(c *jobs.WorkerConfig) { c.TaskCheckInterval = 10 * time.Minute; c.RescueEvery = -1 })
	stopA()
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatalf("no result for the requeued job (a worker polling once in 10 minutes was not woken): %v", err)
	}
	if r.Status != jobs.StatusCompleted || r.Output != "done\n" {
		t.Errorf("requeued job: %+v", r)
	}
	waitFor(t, 20*time.Second, "the requeued job to be acked", func() bool {
		info, err := asynq.NewInspectorFromRedisClient(s.rdb).GetTaskInfo(e.Queue, e.ID)
		return err == nil && info.State == asynq.TaskStateCompleted
	})
}

// TestWorkerRejectsBlankQueue: asynq drops a queue whose name is blank,
// silently; the waker would then wait for a round over a queue that is
// never dequeued, never wait, and the idle worker would poll Redis every
// wakePause (0.5 ms). NewWorker refuses such a name instead.
func TestWorkerRejectsBlankQueue(t *testing.T) {
	s := newStack(t, stackOptions{})
	for _, q := range []string{" ", "\t", "  \n"} {
		t.Run(fmt.Sprintf("%q", q), func(t *testing.T) {
			_, err := jobs.NewWorker(jobs.WorkerConfig{Redis: s.rdb, Gateway: s.client, Pool: s.pool, ReapEvery: -1,
				Queues: map[string]int{q: 1}})
			if err == nil {
				t.Fatalf("NewWorker with queue %q: no error, want one", q)
			}
		})
	}
}

// TestIdleWorkerWakesOnReap: the reaps a worker enqueues on its ticks run
// at once on an idle worker that would poll once in 10 minutes: a reap
// held back by the poll interval would let sandboxes outlive their idle
// TTL by up to -poll-interval.
func TestIdleWorkerWakesOnReap(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorkerW(t, func(c *jobs.WorkerConfig) {
		c.TaskCheckInterval = 10 * time.Minute
		c.ReapEvery = 300 * time.Millisecond
	})
	insp := asynq.NewInspectorFromRedisClient(s.rdb)
	// Three reaps: more than the worker's first round (before it waits)
	// and its round once subscribed could take.
	waitFor(t, 30*time.Second, "three reaps to run", func() bool {
		qi, err := insp.GetQueueInfo(jobs.MaintenanceQueue)
		return err == nil && qi.ProcessedTotal >= 3
	})
}

// TestJobWithoutWakeUpRunsAtNextPoll: a job that becomes runnable with no
// wake-up (a plain asynq client's enqueue: the fault of a lost wake-up)
// still runs, at the idle worker's next poll, 300 ms here: the safety net
// that bounds what a lost wake-up costs.
func TestJobWithoutWakeUpRunsAtNextPoll(t *testing.T) {
	s := newStack(t, stackOptions{})
	w, _ := s.idleWorker(t, 300*time.Millisecond)
	// The one round the worker lets through once subscribed (wake.go's
	// listen) is behind it: from here only a wake-up counts.
	waitFor(t, 20*time.Second, "the worker's subscription", func() bool { return jobs.WokenRounds(w) > 0 })
	task, err := jobs.NewExecTask(jobs.ExecPayload{Job: jobs.Job{TaskID: "no-wake", Command: "echo polled"}})
	if err != nil {
		t.Fatal(err)
	}
	id := "no-wake-" + randID()
	plain := asynq.NewClientFromRedisClient(s.rdb)
	if _, err := plain.Enqueue(task, asynq.TaskID(id), asynq.Queue(jobs.DefaultQueue), asynq.Retention(time.Hour)); err != nil {
		t.Fatal(err)
	}
	before := jobs.WokenRounds(w)
	waitFor(t, 30*time.Second, "the job enqueued without a wake-up to end", func() bool {
		return len(taskInfo(t, s.rdb, id).Result) > 0
	})
	var r jobs.Result
	if err := json.Unmarshal(taskInfo(t, s.rdb, id).Result, &r); err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCompleted || r.Output != "polled\n" {
		t.Errorf("result %+v", r)
	}
	if n := jobs.WokenRounds(w) - before; n != 0 {
		t.Errorf("%d rounds let through by a wake-up: the job had none, so the poll took it", n)
	}
}
