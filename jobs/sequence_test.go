package jobs_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

// repairFast makes a worker's reaper tick, and the sequence repair on it,
// quick enough for a test.
func repairFast(c *jobs.WorkerConfig) {
	c.ReapEvery = 200 * time.Millisecond
	c.SeqRepairAfter = 500 * time.Millisecond
}

// TestSequenceOrderHasNoTimeCap: order holds whatever the clocks say and
// however long a command takes. The worker's clock runs 11 minutes ahead
// (past the 10-minute cap the order used to have) and the head job runs
// for a while: every command still runs in order, and the cwd carries.
func TestSequenceOrderHasNoTimeCap(t *testing.T) {
	s := newStack(t, stackOptions{})
	skewed := func() time.Time { return time.Now().Add(11 * time.Minute) }
	for range 3 {
		s.startWorker(t, func(c *jobs.WorkerConfig) { c.Now = skewed; c.Concurrency = 8 })
	}
	const n = 12
	var js []jobs.Job
	for i := range n {
		cmd := fmt.Sprintf("echo %d >> ~/order", i)
		switch i {
		case 0:
			cmd = "sleep 1.5; " + cmd
		case 3:
			cmd += "; mkdir -p ~/deep && cd ~/deep"
		}
		js = append(js, jobs.Job{ID: fmt.Sprintf("skew-%02d", i), TaskID: "skew", Command: cmd})
	}
	res := s.runJobs(t, 90*time.Second, js...)
	var want strings.Builder
	for i := range n {
		fmt.Fprintf(&want, "%d\n", i)
		r := res[fmt.Sprintf("skew-%02d", i)]
		if r.Status != jobs.StatusCompleted {
			t.Fatalf("job %d: %+v", i, r)
		}
		if deep := strings.HasSuffix(r.Cwd, "/deep"); deep != (i >= 3) {
			t.Errorf("job %d ran in %q", i, r.Cwd)
		}
	}
	if got := s.run1(t, jobs.Job{TaskID: "skew", Command: "cat ~/order"}).Output; got != want.String() {
		t.Errorf("the commands ran in the order\n%swant\n%s", got, want.String())
	}
}

// TestWaitingJobsCostNothing: 1,000 jobs wait behind running heads. None of
// them is pending, active or in the retry set (they are parked), and Redis
// does no more work with them waiting than with none.
func TestWaitingJobsCostNothing(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, func(c *jobs.WorkerConfig) { c.Concurrency = 64 })
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	insp := asynq.NewInspectorFromRedisClient(s.rdb)
	const tasks, behind = 10, 100
	w, err := s.prod.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	marker := "boxq-park-" + randID()
	for i := range tasks {
		e, err := s.prod.Enqueue(ctx, jobs.Job{ID: fmt.Sprintf("head-%d", i), TaskID: fmt.Sprintf("park-%d", i), Command: "BOXQ_TEST_MARK=" + marker + " sleep 60"}, w.Channel())
		if err != nil {
			t.Fatal(err)
		}
		w.Add(e)
	}
	waitFor(t, 30*time.Second, "the heads to run", func() bool { return len(findProcesses(marker)) == tasks })
	idle := redisCommandsOver(t, s.rdb, 2*time.Second)

	for j := range behind {
		for i := range tasks {
			e, err := s.prod.Enqueue(ctx, jobs.Job{ID: fmt.Sprintf("wait-%d-%d", i, j), TaskID: fmt.Sprintf("park-%d", i), Command: "true"}, w.Channel())
			if err != nil {
				t.Fatal(err)
			}
			w.Add(e)
		}
	}
	q, err := insp.GetQueueInfo(jobs.DefaultQueue)
	if err != nil {
		t.Fatal(err)
	}
	if q.Pending != 0 || q.Retry != 0 || q.Active != tasks || q.Scheduled != tasks*behind {
		t.Errorf("queue: %d pending, %d active, %d retry, %d scheduled; want 0, %d, 0, %d", q.Pending, q.Active, q.Retry, q.Scheduled, tasks, tasks*behind)
	}
	waiting := redisCommandsOver(t, s.rdb, 2*time.Second)
	t.Logf("Redis commands in 2 s behind %d running heads: %d with no job waiting, %d with %d waiting", tasks, idle, waiting, tasks*behind)
	// Measured side by side on a shared machine: allow noise, not growth
	// (before sequences, each waiting job was dequeued and put back again
	// and again: tens of thousands of commands a second).
	if waiting > 2*idle+200 {
		t.Errorf("Redis did %d commands with %d jobs waiting against %d with none: waiting costs", waiting, tasks*behind, idle)
	}
	// Let the heads go: everything behind them runs, in order.
	for i := range tasks {
		if err := s.prod.Cancel(ctx, fmt.Sprintf("head-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	got := 0
	for w.Pending() > 0 {
		r, err := w.Next(ctx)
		if err != nil {
			t.Fatalf("after %d results: %v", got, err)
		}
		got++
		if strings.HasPrefix(r.ID, "wait-") && r.Status != jobs.StatusCompleted {
			t.Errorf("job %s: %+v", r.ID, r)
		}
	}
}

// redisCommandsOver counts the commands Redis processed over d.
func redisCommandsOver(t *testing.T, rdb *redis.Client, d time.Duration) int64 {
	t.Helper()
	read := func() int64 {
		info, err := rdb.Info(context.Background(), "stats").Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(line, "total_commands_processed:"); ok {
				n, _ := strconv.ParseInt(v, 10, 64)
				return n
			}
		}
		t.Skip("this Redis reports no total_commands_processed (the embedded fallback)")
		return 0
	}
	before := read()
	time.Sleep(d) // a measurement window, not synchronisation
	return read() - before
}

// TestSequenceMovesOn: whatever ends a head's turn, the task's next job
// runs: a failed command, an "error" result, a head deleted or archived
// from the dashboard, a cancelled waiting job (which never runs).
func TestSequenceMovesOn(t *testing.T) {
	// The gateway refuses, for good, the start of a command marked so: the
	// job ends with status "error".
	refuse := func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/execs") && r.Method == http.MethodPost {
				body, _ := io.ReadAll(r.Body)
				if bytes.Contains(body, []byte("REFUSE-ME")) {
					w.Header().Set("Content-Type", "application/json")
					w.WriteHeader(http.StatusBadRequest)
					_, _ = w.Write([]byte(`{"error":"refused for the test"}`))
					return
				}
				r.Body = io.NopCloser(bytes.NewReader(body))
			}
			h.ServeHTTP(w, r)
		})
	}
	s := newStack(t, stackOptions{front: refuse})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	insp := asynq.NewInspectorFromRedisClient(s.rdb)

	// No worker yet: the heads stay pending.
	del, _ := s.submit(t, ctx, jobs.Job{ID: "mo-deleted", TaskID: "mo-del", Command: "echo deleted >> ~/ran"})
	wdel, _ := s.submit(t, ctx, jobs.Job{ID: "mo-after-deleted", TaskID: "mo-del", Command: "echo after >> ~/ran; cat ~/ran"})
	_, _ = s.submit(t, ctx, jobs.Job{ID: "mo-archived", TaskID: "mo-arch", Command: "echo archived >> ~/ran"})
	warch, _ := s.submit(t, ctx, jobs.Job{ID: "mo-after-archived", TaskID: "mo-arch", Command: "echo after >> ~/ran; cat ~/ran"})
	_ = del
	if err := insp.DeleteTask(jobs.DefaultQueue, "mo-deleted"); err != nil {
		t.Fatal(err)
	}
	if err := insp.ArchiveTask(jobs.DefaultQueue, "mo-archived"); err != nil {
		t.Fatal(err)
	}
	// A waiting job cancelled: its result at once, with no worker running.
	s.submit(t, ctx, jobs.Job{ID: "mo-first", TaskID: "mo-can", Command: "echo first >> ~/ran"})
	wcan, _ := s.submit(t, ctx, jobs.Job{ID: "mo-cancelled", TaskID: "mo-can", Command: "echo cancelled >> ~/ran"})
	wlast, _ := s.submit(t, ctx, jobs.Job{ID: "mo-last", TaskID: "mo-can", Command: "echo last >> ~/ran; cat ~/ran"})
	_, state, ok, err := s.prod.Lookup(ctx, "mo-last")
	if err != nil || ok || !strings.Contains(state, "behind job mo-first, 2 ahead") {
		t.Errorf("Lookup of a waiting job: state %q, ok %v, err %v; want waiting behind mo-first, 2 ahead", state, ok, err)
	}
	if err := s.prod.Cancel(ctx, "mo-cancelled"); err != nil {
		t.Fatal(err)
	}
	r, err := wcan.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCancelled || r.ReturnCode != 130 {
		t.Errorf("cancelled waiting job: %+v", r)
	}
	// A failed command, and an "error" result, do not stop the task.
	s.submit(t, ctx, jobs.Job{ID: "mo-fails", TaskID: "mo-err", Command: "mkdir -p ~/w && cd ~/w && false"})
	werr, _ := s.submit(t, ctx, jobs.Job{ID: "mo-error", TaskID: "mo-err", Command: "echo REFUSE-ME"})
	wok, _ := s.submit(t, ctx, jobs.Job{ID: "mo-after-error", TaskID: "mo-err", Command: "pwd"})

	s.startWorker(t, repairFast)
	for _, c := range []struct {
		w    *jobs.Waiter
		want string
	}{{wdel, "after\n"}, {warch, "after\n"}, {wlast, "first\nlast\n"}} {
		r, err := c.w.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if r.Status != jobs.StatusCompleted || r.Output != c.want {
			t.Errorf("job %s: %+v; want completed with %q", r.ID, r, c.want)
		}
	}
	if r, err := werr.Next(ctx); err != nil || r.Status != jobs.StatusError || !strings.Contains(r.Error, "refused for the test") {
		t.Errorf("refused job: %+v, %v; want status error", r, err)
	}
	// Its result lasts the job's retention: the job is done to asynq, not
	// archived (asynq trims its archive to the newest 10,000 per queue).
	waitFor(t, 10*time.Second, "the failed job to be completed", func() bool {
		return taskInfo(t, s.rdb, "mo-error").State == asynq.TaskStateCompleted
	})
	r, err = wok.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCompleted || !strings.HasSuffix(strings.TrimSpace(r.Output), "/w") {
		t.Errorf("job after a failed command and an error: %+v; want it run, in the failed command's cwd", r)
	}
}

// producerDied is the panic of a producer that dies at a fault point.
type producerDied struct{}

// producerDies is a fault point at which the producer dies.
func producerDies() { panic(producerDied{}) }

// enqueueDying enqueues j with fault points installed, one of which is to
// kill the producer (producerDies): the enqueue stops there, as a process
// would that died.
func enqueueDying(t *testing.T, ctx context.Context, prod *jobs.Producer, j jobs.Job, afterJoin, beforeConfirm func()) {
	t.Helper()
	jobs.SetProducerFaults(prod, afterJoin, beforeConfirm)
	defer jobs.SetProducerFaults(prod, nil, nil)
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(producerDied); !ok {
				panic(r)
			}
		}
	}()
	_, _ = prod.Enqueue(ctx, j, "")
	t.Fatalf("the producer of %s did not die", j.ID)
}

// TestSequenceRepairsAProducerThatDied: a producer that dies between the
// steps of an enqueue leaves the sequence in a state the repair (on the
// reaper's tick) moves on from: no job skipped, none run twice.
func TestSequenceRepairsAProducerThatDied(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, repairFast)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	enqueueDying := func(j jobs.Job, afterJoin, beforeConfirm func()) {
		t.Helper()
		enqueueDying(t, ctx, s.prod, j, afterJoin, beforeConfirm)
	}
	die := producerDies

	// Died between join and enqueue, as the head: the job never exists.
	// The next job waits behind its place until the repair passes it.
	enqueueDying(jobs.Job{ID: "pd-never", TaskID: "pd-a", Command: "echo never >> ~/ran"}, die, nil)
	r := s.run1(t, jobs.Job{ID: "pd-next", TaskID: "pd-a", Command: "echo next >> ~/ran; cat ~/ran"})
	if r.Status != jobs.StatusCompleted || r.Output != "next\n" {
		t.Errorf("job after a head that never came: %+v", r)
	}

	// Died after a parked enqueue, before its confirm, while its
	// predecessor ended between its join and its enqueue: it got the turn
	// while it did not exist, and nobody promoted it. The repair does.
	wfirst, _ := s.submit(t, ctx, jobs.Job{ID: "pd-first", TaskID: "pd-b", Command: "sleep 0.3; echo first >> ~/ran"})
	var sw *jobs.Waiter
	sw, err := s.prod.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sw.Close()
	sw.Add(jobs.Enqueued{ID: "pd-second", Queue: jobs.DefaultQueue})
	enqueueDying(jobs.Job{ID: "pd-second", TaskID: "pd-b", Command: "echo second >> ~/ran; cat ~/ran"},
		func() {
			if _, err := wfirst.Next(ctx); err != nil {
				t.Fatal(err)
			}
		}, die)
	r, err = sw.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCompleted || r.Output != "first\nsecond\n" {
		t.Errorf("parked job whose producer died before confirm: %+v", r)
	}

	// The same, without the death: confirm promotes it at once.
	wfirst, _ = s.submit(t, ctx, jobs.Job{ID: "pc-first", TaskID: "pd-c", Command: "echo first >> ~/ran"})
	jobs.SetProducerFaults(s.prod, func() {
		if _, err := wfirst.Next(ctx); err != nil {
			t.Fatal(err)
		}
	}, nil)
	w2, _ := s.submit(t, ctx, jobs.Job{ID: "pc-second", TaskID: "pd-c", Command: "echo second >> ~/ran; cat ~/ran"})
	jobs.SetProducerFaults(s.prod, nil, nil)
	if r, err := w2.Next(ctx); err != nil || r.Output != "first\nsecond\n" {
		t.Errorf("confirmed job: %+v, %v", r, err)
	}
}

// TestTerminateActsAtOnce: -terminate of a task whose command runs, with
// jobs waiting behind it: the command is cancelled, the waiting jobs end
// cancelled without running, all saying "task terminated", and the sandbox
// ends. -if-idle leaves a busy task alone, and ends an idle one.
func TestTerminateActsAtOnce(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	marker := "boxq-term-" + randID()
	whead, _ := s.submit(t, ctx, jobs.Job{ID: "tm-head", TaskID: "tm", Command: "BOXQ_TEST_MARK=" + marker + " sleep 60"})
	var waiting []*jobs.Waiter
	for i := range 3 {
		w, _ := s.submit(t, ctx, jobs.Job{ID: fmt.Sprintf("tm-wait-%d", i), TaskID: "tm", Command: "touch ~/waiting-ran"})
		waiting = append(waiting, w)
	}
	waitFor(t, 20*time.Second, "the head to run", func() bool { return len(findProcesses(marker)) > 0 })

	id, err := s.prod.Terminate(ctx, "tm", true)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := s.prod.WaitTerminate(ctx, id); err != nil || out.Status != "busy" {
		t.Errorf("-if-idle of a busy task: %+v, %v; want busy", out, err)
	}

	id, err = s.prod.Terminate(ctx, "tm", false)
	if err != nil {
		t.Fatal(err)
	}
	out, err := s.prod.WaitTerminate(ctx, id)
	if err != nil || out.Status != "terminated" {
		t.Fatalf("terminate: %+v, %v", out, err)
	}
	for _, w := range append([]*jobs.Waiter{whead}, waiting...) {
		r, err := w.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if r.Status != jobs.StatusCancelled || r.ReturnCode != 130 || !strings.Contains(r.Error, jobs.TerminateReason) {
			t.Errorf("job %s: %+v; want cancelled, %q", r.ID, r, jobs.TerminateReason)
		}
	}
	waitFor(t, 10*time.Second, "the head's command to be killed", func() bool { return len(findProcesses(marker)) == 0 })
	if live, err := s.client.List(ctx); err != nil || len(live) != 0 {
		t.Errorf("sandboxes live after terminate: %v, %v", live, err)
	}
	// The task goes on with its next command, in a new sandbox; the
	// waiting jobs never ran.
	if r := s.run1(t, jobs.Job{TaskID: "tm", Command: "ls ~/waiting-ran 2>/dev/null || echo absent"}); r.Output != "absent\n" {
		t.Errorf("a cancelled waiting job ran: %+v", r)
	}
	id, err = s.prod.Terminate(ctx, "tm", true)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := s.prod.WaitTerminate(ctx, id); err != nil || out.Status != "terminated" {
		t.Errorf("-if-idle of an idle task: %+v, %v; want terminated", out, err)
	}
}

// TestDeletedCwdDoesNotBlockTheTask: a command deletes the directory the
// task's cwd tracks; the next command runs from the sandbox's default
// directory and its result says so, instead of rc 126 for good (issue 12,
// item 4). A cwd the job names itself that does not exist is still 126.
func TestDeletedCwdDoesNotBlockTheTask(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	res := s.runJobs(t, time.Minute,
		jobs.Job{ID: "dc-1", TaskID: "dc", Command: "mkdir -p ~/g && cd ~/g"},
		jobs.Job{ID: "dc-2", TaskID: "dc", Command: "rmdir ~/g"},
		jobs.Job{ID: "dc-3", TaskID: "dc", Command: "pwd"},
		jobs.Job{ID: "dc-4", TaskID: "dc", Command: "pwd"},
		jobs.Job{ID: "dc-5", TaskID: "dc", Command: "pwd", Cwd: "/no/such/dir"},
	)
	gone := res["dc-1"].Cwd
	if !strings.HasSuffix(gone, "/g") {
		t.Fatalf("first command's cwd %q", gone)
	}
	r := res["dc-3"]
	if r.Status != jobs.StatusCompleted || r.ReturnCode != 0 || !r.CwdReset || !strings.Contains(r.Error, gone) || strings.TrimSpace(r.Output) == gone {
		t.Errorf("after the cwd was deleted: %+v; want rc 0 from the default directory, cwd_reset, and the gone directory named", r)
	}
	if r4 := res["dc-4"]; r4.ReturnCode != 0 || r4.CwdReset || r4.Output != r.Output {
		t.Errorf("the command after: %+v; want it to run where the last one ended, with no reset", r4)
	}
	if r5 := res["dc-5"]; r5.ReturnCode != 126 || r5.CwdReset {
		t.Errorf("a job's own missing cwd: %+v; want rc 126", r5)
	}
}

// TestSameIDInTwoQueuesIsRejected: a second job with an id that a job of
// another queue has would attach to that job's command (exec ids derive
// from the id): it is refused at enqueue (issue 12, item 8).
func TestSameIDInTwoQueuesIsRejected(t *testing.T) {
	s := newStack(t, stackOptions{})
	ctx := context.Background()
	if _, err := s.prod.Enqueue(ctx, jobs.Job{ID: "twice", TaskID: "a", Command: "true", Queue: "one"}, ""); err != nil {
		t.Fatal(err)
	}
	_, err := s.prod.Enqueue(ctx, jobs.Job{ID: "twice", TaskID: "b", Command: "true", Queue: "two"}, "")
	if err == nil || !strings.Contains(err.Error(), `already a job of queue "one"`) {
		t.Errorf("the same id in a second queue: %v; want it refused, naming the queue", err)
	}
	// The same id in the same queue is still the same job.
	if e, err := s.prod.Enqueue(ctx, jobs.Job{ID: "twice", TaskID: "a", Command: "true", Queue: "one"}, ""); err != nil || !e.Existed {
		t.Errorf("the same id again in its queue: %+v, %v; want Existed", e, err)
	}
}

// TestNewSandboxIsSaidToBe: after a terminate or an idle reap, the task's
// next command runs in a new sandbox, and its result says so
// (sandbox_recreated). A persistent task gets its files back from the
// snapshot, and its cwd with them; a non-persistent one starts over in the
// sandbox's default directory (issue 12, item 5).
//
// Under bwrap a sandbox's home is /root in every sandbox, so the cwd comes
// back as it was; without isolation each sandbox has a directory of its
// own, so a cwd does not carry to another sandbox (it resets, and says so).
func TestNewSandboxIsSaidToBe(t *testing.T) {
	s := newStack(t, stackOptions{isolation: local.IsolationAuto})
	isolated := s.gw.Isolation() == local.IsolationBwrap
	if !isolated && os.Getenv("BOXQ_REQUIRE_BWRAP") == "1" {
		t.Fatal("bubblewrap does not work here, and BOXQ_REQUIRE_BWRAP=1")
	}
	s.startWorker(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	terminate := func(task string) {
		id, err := s.prod.Terminate(ctx, task, false)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.prod.WaitTerminate(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	reap := func(string) {
		if _, err := s.pool.ReapIdle(ctx, time.Now().Add(time.Hour), time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name       string
		persistent bool
		end        func(task string)
	}{
		{"persistent/terminate", true, terminate},
		{"persistent/reap", true, reap},
		{"not persistent/terminate", false, terminate},
		{"not persistent/reap", false, reap},
	} {
		t.Run(c.name, func(t *testing.T) {
			task := "ns-" + strings.NewReplacer("/", "-", " ", "-").Replace(c.name)
			first := s.run1(t, jobs.Job{TaskID: task, Command: "mkdir -p ~/p && cd ~/p && echo kept > f", Persistent: ptr(c.persistent)})
			if first.SandboxRecreated {
				t.Errorf("first sandbox said to be recreated: %+v", first)
			}
			c.end(task)
			r := s.run1(t, jobs.Job{TaskID: task, Command: "pwd; cat ~/p/f 2>/dev/null || echo lost", Persistent: ptr(c.persistent)})
			if !r.SandboxRecreated || r.SandboxID == first.SandboxID {
				t.Errorf("after the sandbox ended: %+v; want a new sandbox, sandbox_recreated", r)
			}
			lines := strings.Split(strings.TrimSpace(r.Output), "\n")
			inP := len(lines) == 2 && strings.HasSuffix(lines[0], "/p")
			if c.persistent && (!inP && isolated || lines[len(lines)-1] != "kept") {
				t.Errorf("persistent task: output %q; want its cwd and file back", r.Output)
			}
			if c.persistent && !isolated && !r.CwdReset {
				t.Errorf("persistent task without isolation: %+v; want its cwd reset, saying so", r)
			}
			if !c.persistent && (inP || lines[len(lines)-1] != "lost") {
				t.Errorf("non-persistent task: output %q; want the default cwd and no file", r.Output)
			}
		})
	}
}

// TestStartedCommandNeverRunsTwice: a worker stops (the exec is left
// running for the job's next delivery), the command finishes, and then its
// sandbox goes (Terminate ignores the exec in flight and snapshots it).
// The next delivery must not run the command again in a new sandbox; it
// answers error, and the command ran once (issue 12, item 1: it printed 2).
func TestStartedCommandNeverRunsTwice(t *testing.T) {
	s := newStack(t, stackOptions{})
	noRescue := func(c *jobs.WorkerConfig) { c.ShutdownTimeout = 300 * time.Millisecond; c.RescueEvery = -1 }
	stopA := s.startWorker(t, noRescue)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	marker := "boxq-twice-" + randID()
	w, e := s.submit(t, ctx, jobs.Job{ID: "twice-run", TaskID: "tw", Command: "echo run >> ~/runs; BOXQ_TEST_MARK=" + marker + " sleep 1; wc -l < ~/runs"})
	waitFor(t, 20*time.Second, "the command to start", func() bool { return len(findProcesses(marker)) > 0 })
	stopA()
	waitFor(t, 20*time.Second, "the command to end", func() bool { return len(findProcesses(marker)) == 0 })
	if err := s.pool.Terminate(ctx, "tw"); err != nil {
		t.Fatal(err)
	}
	s.startWorker(t, noRescue)
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.ID != e.ID || r.Status != jobs.StatusError || !strings.Contains(r.Error, "not run again") {
		t.Errorf("result %+v; want status error: the sandbox was lost, not run again", r)
	}
	if got := s.run1(t, jobs.Job{TaskID: "tw", Command: "wc -l < ~/runs"}); strings.TrimSpace(got.Output) != "1" {
		t.Errorf("the command ran %q times, want 1", strings.TrimSpace(got.Output))
	}
}

// TestSandboxLifetime: a persistent sandbox near the end of its lifetime is
// rotated between commands (its successor gets its files and the cwd),
// rather than have the gateway cut the next command; a command cut anyway
// (here a non-persistent sandbox, which does not rotate) ends with status
// error saying why, not "cancelled" as if a user had cancelled it (issue
// 12, item 2).
func TestSandboxLifetime(t *testing.T) {
	s := newStack(t, stackOptions{})
	var ahead atomic.Int64 // the worker's clock runs ahead by this much
	s.startWorker(t, func(c *jobs.WorkerConfig) {
		c.SandboxLifetime = 8 * time.Second
		c.Now = func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	})
	first := s.run1(t, jobs.Job{TaskID: "life", Command: "mkdir -p ~/w && cd ~/w && echo kept > f", TimeoutS: ptr(1.0)})
	// The sandbox ages, as the worker sees it: what is left of its lifetime
	// no longer fits the next command.
	ahead.Store(int64(3 * time.Second))
	r := s.run1(t, jobs.Job{TaskID: "life", Command: "cat ~/w/f; sleep 0.5", TimeoutS: ptr(2.0)})
	if r.Status != jobs.StatusCompleted || r.Output != "kept\n" || !r.SandboxRecreated || r.SandboxID == first.SandboxID {
		t.Errorf("next command: %+v; want it run in a rotated sandbox, with the files", r)
	}

	// The gateway ends a sandbox under a running command (its lifetime, a
	// hosted gateway's limits): played here by a terminate behind the
	// pool's back.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	marker := "boxq-cut-" + randID()
	w, _ := s.submit(t, ctx, jobs.Job{ID: "cut", TaskID: "life-np", Command: "BOXQ_TEST_MARK=" + marker + " sleep 30", Persistent: ptr(false)})
	waitFor(t, 20*time.Second, "the command to start", func() bool { return len(findProcesses(marker)) > 0 })
	rec, _, err := s.pool.Get(ctx, "life-np")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.client.Terminate(ctx, rec.SandboxID, false); err != nil {
		t.Fatal(err)
	}
	cut, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cut.Status != jobs.StatusError || !strings.Contains(cut.Error, "lifetime") || !strings.Contains(cut.Error, "not cancelled by a user") {
		t.Errorf("a command cut by the gateway: %+v; want status error saying so, not cancelled", cut)
	}
}

// TestFinalErrorStopsTheCommand: a job that ends for good while its command
// may still run (here the gateway refuses its polls with a permanent
// error) cancels the command first, so that the task's next command cannot
// overlap it (issue 12, item 6: the lease and the mark were let go with the
// command still running).
func TestFinalErrorStopsTheCommand(t *testing.T) {
	var refusePolls atomic.Bool
	front := func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if refusePolls.Load() && r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/execs/") {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusBadRequest)
				_, _ = w.Write([]byte(`{"error":"poll refused for the test"}`))
				return
			}
			h.ServeHTTP(w, r)
		})
	}
	s := newStack(t, stackOptions{front: front})
	s.startWorker(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	marker := "boxq-final-" + randID()
	refusePolls.Store(true)
	w, _ := s.submit(t, ctx, jobs.Job{ID: "final-err", TaskID: "fe", Command: "echo a >> ~/log; BOXQ_TEST_MARK=" + marker + " sleep 30; echo b >> ~/log"})
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	refusePolls.Store(false)
	if r.Status != jobs.StatusError || !strings.Contains(r.Error, "poll refused") {
		t.Fatalf("result %+v; want status error from the refused poll", r)
	}
	// It is cancelled right after the result is written (the task's next
	// command waits for the lease meanwhile); left alone it would sleep on
	// for 30 s.
	waitFor(t, 10*time.Second, "the command of the failed job to be stopped", func() bool { return len(findProcesses(marker)) == 0 })
	if got := s.run1(t, jobs.Job{TaskID: "fe", Command: "cat ~/log"}); got.Output != "a\n" {
		t.Errorf("log %q; want only the first line (the command stopped)", got.Output)
	}
}

// TestLastAttemptOutOfTimeLeavesAResult: a job's last attempt runs out of
// asynq's deadline while it waits for its task's sandbox (held elsewhere):
// the job ends with an "error" result that says so, rather than no result
// at all (issue 12, item 7).
func TestLastAttemptOutOfTimeLeavesAResult(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	held, err := s.pool.Acquire(ctx, "held", sandboxpool.Spec{}, "")
	if err != nil {
		t.Fatal(err)
	}
	defer s.pool.Release(ctx, held, "")
	w, err := s.prod.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	// Enqueued as Producer.Enqueue does (a nonce: boxq's own job, with a
	// retention), but with a 1 s deadline and no retries.
	payload, _ := json.Marshal(jobs.ExecPayload{Job: jobs.Job{TaskID: "held", Command: "true"}, Nonce: "0123456789abcdef", Notify: w.Channel()})
	client := asynq.NewClientFromRedisClient(s.rdb)
	if _, err := client.Enqueue(asynq.NewTask(jobs.TypeExec, payload), asynq.TaskID("out-of-time"), asynq.MaxRetry(0),
		asynq.Timeout(time.Second), asynq.Retention(time.Hour)); err != nil {
		t.Fatal(err)
	}
	w.Add(jobs.Enqueued{ID: "out-of-time", Queue: jobs.DefaultQueue})
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusError || !strings.Contains(r.Error, "giving up") || strings.Contains(r.Error, "without a result") {
		t.Errorf("result %+v; want an error result of the job's own, saying it gave up", r)
	}
}

// TestRescuerLeavesAnUnstartedCommandToItsJob: a worker dies after it took
// a job's lease but before it started the command (it was creating the
// task's sandbox). The rescuer must not answer for a command that never
// ran: it clears the mark, and the job runs when asynq delivers it.
func TestRescuerLeavesAnUnstartedCommandToItsJob(t *testing.T) {
	s := newStack(t, stackOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	w, e := s.submit(t, ctx, jobs.Job{ID: "unstarted", TaskID: "us", Command: "echo ran >> ~/runs; wc -l < ~/runs"})
	// The dying worker: its own Redis client, closed after the take, so
	// that its lease lapses unrenewed.
	opt, err := redis.ParseURL(s.redisURL)
	if err != nil {
		t.Fatal(err)
	}
	dying := redis.NewClient(opt)
	pool, err := sandboxpool.New(dying, s.client, sandboxpool.Config{LeaseTTL: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pool.AcquireFor(ctx, "us", sandboxpool.Spec{}, sandboxpool.Intent{
		ExecID: jobs.ExecID(e.ID), Note: jobs.RescueNoteFor(e.Queue, e.ID, "us"), Stamp: jobs.TaskKey(e.Queue, e.ID)}); err != nil {
		t.Fatal(err)
	}
	dying.Close() // dead: it created the sandbox, never started the command
	// A worker that serves another queue: only its rescuer can touch the
	// job, which must leave it be.
	stop := s.startWorker(t, func(c *jobs.WorkerConfig) { c.Queues = map[string]int{"elsewhere": 1} })
	waitFor(t, 20*time.Second, "the rescuer to clear the dead worker's mark", func() bool {
		fields, _ := s.rdb.HKeys(ctx, "boxq:sandbox:us").Result()
		return !slices.ContainsFunc(fields, func(f string) bool { return strings.HasPrefix(f, "inflight:") })
	})
	stop()
	if res, _ := s.rdb.HGet(ctx, jobs.TaskKey(e.Queue, e.ID), "result").Result(); res != "" {
		t.Fatalf("the rescuer answered for a command that never started: %s", res)
	}
	s.startWorker(t, nil)
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCompleted || strings.TrimSpace(r.Output) != "1" || r.Rescued {
		t.Errorf("result %+v; want the job itself to run its command, once", r)
	}
}

// TestRecreateRefusedForNowThenRuns: the task's sandbox is gone when a
// job starts, and the create of its successor is refused for now (429).
// The job's next delivery runs the command in the new sandbox: it never
// started anywhere, so it is not "lost while it ran".
func TestRecreateRefusedForNowThenRuns(t *testing.T) {
	var refuseCreate atomic.Int32
	front := func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPost && r.URL.Path == "/v1/sandboxes" && refuseCreate.Add(-1) >= 0 {
				w.Header().Set("Content-Type", "application/json")
				w.Header().Set("Retry-After", "0")
				w.WriteHeader(http.StatusTooManyRequests)
				_, _ = w.Write([]byte(`{"error":"busy for the test"}`))
				return
			}
			h.ServeHTTP(w, r)
		})
	}
	s := newStack(t, stackOptions{front: front})
	s.startWorker(t, nil)
	first := s.run1(t, jobs.Job{TaskID: "rr", Command: "true", Persistent: ptr(false)})
	if err := s.client.Terminate(context.Background(), first.SandboxID, false); err != nil {
		t.Fatal(err)
	}
	refuseCreate.Store(1)
	r := s.run1(t, jobs.Job{TaskID: "rr", Command: "echo ran", Persistent: ptr(false)})
	if r.Status != jobs.StatusCompleted || r.Output != "ran\n" || !r.SandboxRecreated {
		t.Errorf("result %+v; want it run in a recreated sandbox", r)
	}
}

// TestRepairInAQueueOfItsOwn: workers that serve only another queue still
// reap and repair it (the reap task goes to a queue they serve, and the
// repair covers every queue asynq knows).
func TestRepairInAQueueOfItsOwn(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, func(c *jobs.WorkerConfig) { repairFast(c); c.Queues = map[string]int{"q2": 1} })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	enqueueDying(t, ctx, s.prod, jobs.Job{ID: "q2-never", TaskID: "q2t", Command: "true", Queue: "q2"}, producerDies, nil)
	r := s.run1(t, jobs.Job{ID: "q2-next", TaskID: "q2t", Command: "echo next", Queue: "q2"})
	if r.Status != jobs.StatusCompleted || r.Output != "next\n" {
		t.Errorf("result %+v; want the job after the head that never came to run", r)
	}
}

// TestTimeoutFitsTheLifetime: a command's timeout is capped to what fits
// in a whole lifetime of its sandbox, so that it times out (124) rather
// than being cut by the lifetime.
func TestTimeoutFitsTheLifetime(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, func(c *jobs.WorkerConfig) { c.SandboxLifetime = 7 * time.Second })
	r := s.run1(t, jobs.Job{TaskID: "fit", Command: "sleep 30", TimeoutS: ptr(20.0)})
	if r.Status != jobs.StatusTimeout || r.ReturnCode != 124 || !strings.Contains(r.Error, "2s") {
		t.Errorf("result %+v; want a timeout after the capped 2s", r)
	}
}
