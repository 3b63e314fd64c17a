package jobs_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/jobs"
)

func TestCwdCarriesAcrossJobsOfATask(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	r1 := s.run1(t, jobs.Job{TaskID: "t1", Command: "cd /tmp"})
	if r1.Status != jobs.StatusCompleted || r1.ReturnCode != 0 || r1.Cwd != "/tmp" {
		t.Fatalf("cd /tmp: %+v, want completed/0 with cwd /tmp", r1)
	}
	r2 := s.run1(t, jobs.Job{TaskID: "t1", Command: "pwd"})
	if got := strings.TrimSpace(r2.Output); got != "/tmp" {
		t.Errorf("pwd after cd /tmp printed %q, want /tmp", got)
	}
	if r2.SandboxID != r1.SandboxID {
		t.Errorf("second job ran in sandbox %s, first in %s: want the task's one sandbox", r2.SandboxID, r1.SandboxID)
	}
	// An explicit cwd wins over the tracked one.
	r3 := s.run1(t, jobs.Job{TaskID: "t1", Command: "pwd", Cwd: "/"})
	if got := strings.TrimSpace(r3.Output); got != "/" {
		t.Errorf("pwd with cwd / printed %q", got)
	}
}

func TestResultsOfCommands(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	tests := []struct {
		name       string
		job        jobs.Job
		wantStatus string
		wantRC     int
		wantOutput string
	}{
		{"exit 0", jobs.Job{Command: "echo hello"}, jobs.StatusCompleted, 0, "hello\n"},
		{"exit 3", jobs.Job{Command: "echo oops >&2; exit 3"}, jobs.StatusCompleted, 3, "oops\n"},
		{"not found", jobs.Job{Command: "no-such-command-xyz 2>/dev/null"}, jobs.StatusCompleted, 127, ""},
		{"stdin", jobs.Job{Command: "tr a-z A-Z", Stdin: "line one\nline two\n"}, jobs.StatusCompleted, 0, "LINE ONE\nLINE TWO\n"},
		{"stdin compound", jobs.Job{Command: "read a; read b; echo \"$b-$a\"", Stdin: "1\n2\n"}, jobs.StatusCompleted, 0, "2-1\n"},
		{"no trailing newline", jobs.Job{Command: "printf abc"}, jobs.StatusCompleted, 0, "abc"},
		{"missing cwd", jobs.Job{Command: "pwd", Cwd: "/no/such/dir"}, jobs.StatusCompleted, 126, ""},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.job.TaskID = fmt.Sprintf("results-%d", i)
			r := s.run1(t, tt.job)
			if r.Status != tt.wantStatus || r.ReturnCode != tt.wantRC {
				t.Errorf("status %s rc %d, want %s %d (result %+v)", r.Status, r.ReturnCode, tt.wantStatus, tt.wantRC, r)
			}
			if tt.wantOutput != "" || tt.wantRC == 0 {
				if r.Output != tt.wantOutput {
					t.Errorf("output %q, want %q", r.Output, tt.wantOutput)
				}
			}
			if r.Attempts != 1 || r.ExecID != jobs.ExecID(r.ID) || r.SandboxID == "" || r.FinishedAt.Before(r.StartedAt) {
				t.Errorf("bookkeeping fields wrong: %+v", r)
			}
		})
	}
}

func TestTimeoutKillsTheCommand(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	marker := "boxq-timeout-" + randID()
	start := time.Now()
	r := s.run1(t, jobs.Job{TaskID: "slow", Command: "BOXQ_TEST_MARK=" + marker + " sleep 30", TimeoutS: ptr(1.0)})
	if r.Status != jobs.StatusTimeout || r.ReturnCode != 124 {
		t.Fatalf("result %+v, want timeout/124", r)
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("timeout result took %v", d)
	}
	if pids := findProcesses(marker); len(pids) > 0 {
		t.Errorf("processes of the timed-out command still run: %v", pids)
	}
}

func TestLargeOutputIsTruncated(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	r := s.run1(t, jobs.Job{TaskID: "big", Command: "head -c 2000000 /dev/zero | tr '\\0' x; echo; echo END"})
	if r.Status != jobs.StatusCompleted || r.ReturnCode != 0 {
		t.Fatalf("result %s/%d: %s", r.Status, r.ReturnCode, r.Error)
	}
	if !r.Truncated {
		t.Errorf("truncated = false for a 2 MB output")
	}
	if len(r.Output) > 1<<20+200 || !strings.HasSuffix(r.Output, "END\n") || !strings.Contains(r.Output, "bytes omitted") {
		t.Errorf("output is %d bytes, ends %q: want ≤ 1 MiB with the tail kept and the cut said", len(r.Output), r.Output[max(0, len(r.Output)-20):])
	}
	if r.OutputBytes != 2000000+1+4 {
		t.Errorf("output_bytes = %d, want %d", r.OutputBytes, 2000005)
	}
	home := strings.TrimSpace(s.run1(t, jobs.Job{TaskID: "big", Command: "echo $HOME"}).Output)
	if r.Cwd == "" || r.Cwd != home {
		t.Errorf("cwd after truncated output = %q, want the sandbox's home %q (the marker is in the tail)", r.Cwd, home)
	}
}

// TestOwnCutLineIsNotTruncation: a command that prints the gateway's cut
// line itself must not make its result say its output was cut.
func TestOwnCutLineIsNotTruncation(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	r := s.run1(t, jobs.Job{TaskID: "spoof", Command: `printf 'a\n[... 5000 bytes omitted ...]\nb\n'`})
	want := "a\n[... 5000 bytes omitted ...]\nb\n"
	if r.Truncated || r.Output != want || r.OutputBytes != len(want) {
		t.Errorf("result truncated=%v output_bytes=%d output %q; want untruncated, %d bytes, %q", r.Truncated, r.OutputBytes, r.Output, len(want), want)
	}
}

func TestInvalidJobFailsAtOnceWithClearError(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	client := asynq.NewClientFromRedisClient(s.rdb)
	ctx := context.Background()
	w, err := s.prod.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	tests := []struct {
		name    string
		payload string
		want    string
	}{
		{"not json", `{"task_id": "x", "command": `, "invalid job"},
		{"no command", `{"task_id": "x"}`, "command is required"},
		{"no task", `{"command": "true"}`, "task_id is required"},
		{"negative timeout", `{"task_id": "x", "command": "true", "timeout_s": -1}`, "timeout_s must be a positive"},
		{"wrong type", `{"task_id": "x", "command": 42}`, `"command" must be a string`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := "bad-" + strings.ReplaceAll(tt.name, " ", "-")
			payload := tt.payload
			if strings.HasSuffix(payload, "}") {
				payload = payload[:len(payload)-1] + fmt.Sprintf(`, "notify": %q}`, w.Channel())
			}
			if _, err := client.Enqueue(asynq.NewTask(jobs.TypeExec, []byte(payload)), asynq.TaskID(id), asynq.MaxRetry(5)); err != nil {
				t.Fatal(err)
			}
			w.Add(jobs.Enqueued{ID: id, Queue: jobs.DefaultQueue})
			rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			r, err := w.Next(rctx)
			if err != nil {
				t.Fatal(err)
			}
			if r.Status != jobs.StatusError || r.ReturnCode != 1 || !strings.Contains(r.Error, tt.want) {
				t.Errorf("result %+v, want status error with %q", r, tt.want)
			}
			// The result is written before the handler returns; asynq
			// archives the task right after.
			waitFor(t, 5*time.Second, "the task to be archived", func() bool {
				return taskInfo(t, s.rdb, id).State == asynq.TaskStateArchived
			})
			if info := taskInfo(t, s.rdb, id); info.Retried != 0 {
				t.Errorf("task retried %d times, want archived at once with no retry", info.Retried)
			}
		})
	}
	// The producer refuses the same jobs before they reach the queue.
	if _, err := s.prod.Enqueue(ctx, jobs.Job{TaskID: "x"}, ""); err == nil || !strings.Contains(err.Error(), "command is required") {
		t.Errorf("Enqueue without command: %v", err)
	}
}

func TestFanOutGetsOneSandboxPerTask(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, func(c *jobs.WorkerConfig) { c.Concurrency = 64 })
	var js []jobs.Job
	for i := range 50 {
		js = append(js, jobs.Job{ID: fmt.Sprintf("fan-%d", i), TaskID: fmt.Sprintf("fan-task-%d", i), Command: "echo $HOME; sleep 0.2"})
	}
	res := s.runJobs(t, 90*time.Second, js...)
	sandboxes := map[string]bool{}
	for _, r := range res {
		if r.Status != jobs.StatusCompleted || r.ReturnCode != 0 {
			t.Errorf("job %s: %s/%d %s", r.ID, r.Status, r.ReturnCode, r.Error)
		}
		sandboxes[r.SandboxID] = true
	}
	if len(res) != 50 || len(sandboxes) != 50 {
		t.Errorf("%d results over %d sandboxes, want 50 over 50", len(res), len(sandboxes))
	}
}

// TestTaskCommandsRunInOrder: commands of one task enqueued together (a
// batch) run in the order they were enqueued, each where the one before
// left the cwd, however many workers take them; other tasks are not held up.
func TestTaskCommandsRunInOrder(t *testing.T) {
	s := newStack(t, stackOptions{})
	for range 3 {
		s.startWorker(t, func(c *jobs.WorkerConfig) { c.Concurrency = 8 })
	}
	const n = 16
	var js []jobs.Job
	for i := range n {
		cmd := fmt.Sprintf("echo %d >> ~/order", i)
		if i == 4 {
			cmd = "mkdir -p ~/sub && cd ~/sub && " + cmd
		}
		js = append(js, jobs.Job{ID: fmt.Sprintf("ord-%02d", i), TaskID: "ordered", Command: cmd})
		js = append(js, jobs.Job{ID: fmt.Sprintf("other-%02d", i), TaskID: fmt.Sprintf("other-%d", i), Command: "true"})
	}
	res := s.runJobs(t, 90*time.Second, js...)
	home := strings.TrimSpace(s.run1(t, jobs.Job{TaskID: "ordered", Command: "cd ~ && pwd -P"}).Output)
	for i := range n {
		r := res[fmt.Sprintf("ord-%02d", i)]
		if r.Status != jobs.StatusCompleted {
			t.Fatalf("job %s: %+v", r.ID, r)
		}
		want := home
		if i >= 4 {
			want = home + "/sub"
		}
		if r.Cwd != want {
			t.Errorf("job %d: cwd %q, want %q", i, r.Cwd, want)
		}
	}
	got := s.run1(t, jobs.Job{TaskID: "ordered", Command: "cat ~/order"}).Output
	var want strings.Builder
	for i := range n {
		fmt.Fprintf(&want, "%d\n", i)
	}
	if got != want.String() {
		t.Errorf("the commands ran in the order\n%s\nwant\n%s", got, want.String())
	}
}

func TestJobsOfOneTaskNeverOverlap(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, func(c *jobs.WorkerConfig) { c.Concurrency = 16 })
	// A second worker on the same Redis and gateway: exclusion must hold
	// across workers, not just inside one.
	s.startWorker(t, func(c *jobs.WorkerConfig) { c.Concurrency = 16 })
	var js []jobs.Job
	for i := range 8 {
		js = append(js, jobs.Job{ID: fmt.Sprintf("ovl-%d", i), TaskID: "shared",
			Command: fmt.Sprintf("echo start %d >> ~/log; sleep 0.15; echo end %d >> ~/log", i, i)})
	}
	res := s.runJobs(t, 90*time.Second, js...)
	for _, r := range res {
		if r.Status != jobs.StatusCompleted || r.ReturnCode != 0 {
			t.Fatalf("job %s: %+v", r.ID, r)
		}
	}
	log := s.run1(t, jobs.Job{TaskID: "shared", Command: "cat ~/log"})
	lines := strings.Split(strings.TrimSpace(log.Output), "\n")
	if len(lines) != 16 {
		t.Fatalf("log has %d lines, want 16:\n%s", len(lines), log.Output)
	}
	for i := 0; i < len(lines); i += 2 {
		var a, b string
		var n, m int
		fmt.Sscanf(lines[i], "%s %d", &a, &n)
		fmt.Sscanf(lines[i+1], "%s %d", &b, &m)
		if a != "start" || b != "end" || n != m {
			t.Fatalf("commands overlapped at line %d:\n%s", i+1, log.Output)
		}
	}
}

func TestCancelRunningJob(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	marker := "boxq-cancel-" + randID()
	w, e := s.submit(t, ctx, jobs.Job{ID: "cancel-me", TaskID: "c1", Command: "echo started; BOXQ_TEST_MARK=" + marker + " sleep 60"})
	waitFor(t, 20*time.Second, "the command to start", func() bool { return len(findProcesses(marker)) > 0 })
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
	waitFor(t, 5*time.Second, "the cancelled command's processes to go", func() bool { return len(findProcesses(marker)) == 0 })
	// The task's sandbox is free for the next command.
	if r2 := s.run1(t, jobs.Job{TaskID: "c1", Command: "echo next"}); r2.Output != "next\n" {
		t.Errorf("next job after cancel: %+v", r2)
	}
}

// TestCancelFromDashboard cancels a running job the way the dashboard's
// Cancel button does: asynq's CancelProcessing alone, with no mark of
// boxq's. The command must be killed and the job end cancelled/130, as
// with enqueue -cancel, not come back and re-attach.
func TestCancelFromDashboard(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	marker := "boxq-dash-cancel-" + randID()
	w, e := s.submit(t, ctx, jobs.Job{ID: "dash-cancel", TaskID: "dc", Command: "BOXQ_TEST_MARK=" + marker + " sleep 60"})
	waitFor(t, 20*time.Second, "the command to start", func() bool { return len(findProcesses(marker)) > 0 })
	if err := asynq.NewInspectorFromRedisClient(s.rdb).CancelProcessing(e.ID); err != nil {
		t.Fatalf("CancelProcessing: %v", err)
	}
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCancelled || r.ReturnCode != 130 {
		t.Errorf("result %+v, want cancelled/130", r)
	}
	waitFor(t, 5*time.Second, "the cancelled command's processes to go", func() bool { return len(findProcesses(marker)) == 0 })
}

func TestCancelPendingJobNeverRuns(t *testing.T) {
	s := newStack(t, stackOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	w, e := s.submit(t, ctx, jobs.Job{ID: "pending-cancel", TaskID: "pc", Command: "touch ~/ran"})
	if err := s.prod.Cancel(ctx, e.ID); err != nil {
		t.Fatalf("Cancel: %v", err)
	}
	s.startWorker(t, nil) // only now is there a worker
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCancelled || r.ReturnCode != 130 {
		t.Errorf("result %+v, want cancelled/130", r)
	}
	if r2 := s.run1(t, jobs.Job{TaskID: "pc", Command: "ls ~/ran 2>&1 || echo absent"}); !strings.Contains(r2.Output, "absent") {
		t.Errorf("the cancelled pending job ran: %q", r2.Output)
	}
}

func TestSigtermMidExecReattaches(t *testing.T) {
	s := newStack(t, stackOptions{})
	stopA := s.startWorker(t, func(c *jobs.WorkerConfig) { c.ShutdownTimeout = 300 * time.Millisecond })
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	marker := "boxq-sigterm-" + randID()
	w, _ := s.submit(t, ctx, jobs.Job{ID: "survivor", TaskID: "st",
		Command: "echo run >> ~/runs; BOXQ_TEST_MARK=" + marker + " sleep 2\ncat ~/runs | wc -l"})
	waitFor(t, 20*time.Second, "the command to start", func() bool { return len(findProcesses(marker)) > 0 })
	stopA() // like SIGTERM: graceful shutdown with a short timeout
	if len(findProcesses(marker)) == 0 {
		t.Fatalf("stopping the worker killed the command; it should be left running")
	}
	s.startWorker(t, nil)
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCompleted || strings.TrimSpace(r.Output) != "1" {
		t.Errorf("result %+v, want completed with output 1 (the command ran once)", r)
	}
}

func TestSandboxGoneIsRecreated(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	r1 := s.run1(t, jobs.Job{TaskID: "gone", Command: "cd /tmp", Persistent: ptr(false)})
	if err := s.client.Terminate(context.Background(), r1.SandboxID, false); err != nil {
		t.Fatalf("terminate behind the pool's back: %v", err)
	}
	r2 := s.run1(t, jobs.Job{TaskID: "gone", Command: "pwd; echo $HOME", Persistent: ptr(false)})
	if r2.Status != jobs.StatusCompleted || !r2.SandboxRecreated || r2.SandboxID == r1.SandboxID {
		t.Fatalf("result %+v, want completed in a new sandbox with sandbox_recreated", r2)
	}
	// The new sandbox starts in its default cwd, its home (/root under
	// bwrap, the sandbox's own directory without isolation), not in /tmp.
	if lines := strings.Split(strings.TrimSpace(r2.Output), "\n"); len(lines) != 2 || lines[0] != lines[1] || lines[0] == "/tmp" {
		t.Errorf("pwd and $HOME in the recreated sandbox = %q, want the same, the default cwd", lines)
	}
}

func TestReaperTerminatesIdleSandboxesOnly(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, func(c *jobs.WorkerConfig) {
		c.IdleTTL = 500 * time.Millisecond
		c.ReapEvery = 200 * time.Millisecond
	})
	idle := s.run1(t, jobs.Job{TaskID: "idle", Command: "true"})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	w, _ := s.submit(t, ctx, jobs.Job{ID: "busy", TaskID: "busy", Command: "sleep 3; echo survived"})
	waitFor(t, 20*time.Second, "the idle sandbox to be reaped", func() bool {
		_, ok, err := s.pool.Get(ctx, "idle")
		return err == nil && !ok
	})
	live, err := s.client.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sb := range live {
		if sb.ID == idle.SandboxID {
			t.Errorf("reaped sandbox %s is still live at the gateway", sb.ID)
		}
	}
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCompleted || r.Output != "survived\n" {
		t.Errorf("busy job: %+v, want it untouched by the reaper", r)
	}
}

func TestGatewayCapacityWaitDoesNotUseRetries(t *testing.T) {
	var refused atomic.Int32
	s := newStack(t, stackOptions{front: func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/execs") && refused.Add(1) <= 3 {
				w.Header().Set("Retry-After", "0")
				w.WriteHeader(http.StatusTooManyRequests)
				_, _ = w.Write([]byte(`{"error":"too many execs"}`))
				return
			}
			next.ServeHTTP(w, r)
		})
	}})
	s.startWorker(t, nil)
	r := s.run1(t, jobs.Job{ID: "cap", TaskID: "cap", Command: "echo through"})
	if r.Status != jobs.StatusCompleted || r.Output != "through\n" {
		t.Fatalf("result %+v", r)
	}
	if r.Attempts != 1 {
		t.Errorf("attempts = %d after 3 capacity waits, want 1 (capacity waits are not failures)", r.Attempts)
	}
	if n := refused.Load(); n < 4 {
		t.Errorf("gateway saw %d starts, want at least 4", n)
	}
}

func TestResultVisibleToInspector(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	r := s.run1(t, jobs.Job{ID: "insp", TaskID: "insp", Command: "echo hi"})
	// The result is published before asynq hears that the handler is done
	// (boxq writes it in the handler), so the state may still be active.
	var info *asynq.TaskInfo
	waitFor(t, 5*time.Second, "asynq to record the task's end", func() bool {
		info = taskInfo(t, s.rdb, "insp")
		return info.State != asynq.TaskStateActive
	})
	if info.State != asynq.TaskStateCompleted {
		t.Errorf("state %v, want completed", info.State)
	}
	if got := decodeResult(t, info.Result); got.Output != r.Output || got.ID != "insp" {
		t.Errorf("inspector result %+v, want the published one %+v", got, r)
	}
	res, state, ok, err := s.prod.Lookup(context.Background(), "insp")
	if err != nil || !ok || state != "completed" || res.Output != "hi\n" {
		t.Errorf("Lookup = %+v %q %v %v", res, state, ok, err)
	}
}

func TestSameIDTwiceIsOneJob(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	j := jobs.Job{ID: "once", TaskID: "once", Command: "echo x >> ~/n; wc -l < ~/n"}
	r1 := s.run1(t, j)
	e, err := s.prod.Enqueue(context.Background(), j, "")
	if err != nil || !e.Existed {
		t.Fatalf("second Enqueue = %+v, %v; want Existed", e, err)
	}
	r2 := s.runJobs(t, 30*time.Second, j)["once"]
	if r1.Output != "1\n" || r2.Output != "1\n" {
		t.Errorf("outputs %q then %q, want 1 both times (one run)", r1.Output, r2.Output)
	}
}

// findProcesses returns the pids whose command line contains s.
// findProcesses returns the processes whose environment holds the mark s
// (commands under test run "BOXQ_TEST_MARK=<s> sleep …"): the wrapped
// script itself is not in any process's argv (the gateway hands it to bash
// on a file descriptor, so that a command cannot read its marker's nonce).
func findProcesses(s string) []string {
	ents, _ := os.ReadDir("/proc")
	var pids []string
	self := strconv.Itoa(os.Getpid())
	for _, e := range ents {
		if e.Name() == "self" || e.Name() == self {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err == nil && strings.Contains(string(b), "BOXQ_TEST_MARK="+s+"\x00") {
			pids = append(pids, e.Name())
		}
	}
	return pids
}

// helperWorkerEnv makes the test binary run as a worker process (for the
// SIGKILL test): a real process that can really die.
const helperWorkerEnv = "BOXQ_TEST_HELPER_WORKER"

func helperWorkerMain() int {
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	err := app.RunWorker(ctx, app.WorkerOptions{
		RedisURL: os.Getenv("REDIS_URL"), GatewayURL: os.Getenv("GATEWAY_URL"), Token: os.Getenv("GATEWAY_TOKEN"),
		Concurrency: 8, IdleTTL: time.Hour, ReapEvery: time.Hour,
		OnReady: func(string) { fmt.Println("ready") },
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func startWorkerProcess(t *testing.T, s *stack) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperWorkerEnv+"=1", "REDIS_URL="+s.redisURL, "GATEWAY_URL="+s.gwURL, "GATEWAY_TOKEN="+testToken)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if sc.Text() == "ready" {
				ready <- true
			}
		}
		close(ready)
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatal("worker process exited before it was ready")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("worker process not ready after 30s")
	}
	return cmd
}

// killProcess SIGKILLs a helper process and waits for it to be gone.
func killProcess(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
}

func TestSigkillMidExecRunsOnce(t *testing.T) {
	t.Parallel()
	s := newStack(t, stackOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	a := startWorkerProcess(t, s)
	marker := "boxq-sigkill-" + randID()
	w, _ := s.submit(t, ctx, jobs.Job{ID: "killed", TaskID: "sk",
		Command: "echo run >> ~/runs; BOXQ_TEST_MARK=" + marker + " sleep 2\nwc -l < ~/runs"})
	waitFor(t, 20*time.Second, "the command to start", func() bool { return len(findProcesses(marker)) > 0 })
	killProcess(t, a)
	killedAt := time.Now()
	startWorkerProcess(t, s)
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(killedAt)
	t.Logf("result arrived %v after the SIGKILL (a rescuer collects a dead worker's command once its lease lapses)", took.Round(100*time.Millisecond))
	if r.Status != jobs.StatusCompleted || strings.TrimSpace(r.Output) != "1" || !r.Rescued {
		t.Errorf("result %+v, want completed by a rescuer with output 1 (ran once)", r)
	}
	if took > 30*time.Second {
		t.Errorf("the result came %v after the kill: asynq's recovery, not the rescuer", took.Round(time.Second))
	}
	b, _ := json.Marshal(r)
	t.Logf("result: %s", b)
}

func TestWaiterSweepFindsUnnotifiedResults(t *testing.T) {
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w, err := s.prod.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	// Enqueued without this waiter's channel: only the sweep can find it,
	// as for a notification lost in a Redis restart.
	e, err := s.prod.Enqueue(ctx, jobs.Job{ID: "quiet", TaskID: "quiet", Command: "echo found"}, "")
	if err != nil {
		t.Fatal(err)
	}
	w.Add(e)
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.ID != "quiet" || r.Output != "found\n" {
		t.Errorf("result %+v", r)
	}
	// A job that does not exist is reported, not waited for forever.
	w.Add(jobs.Enqueued{ID: "never-enqueued", Queue: jobs.DefaultQueue})
	r, err = w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusError || !strings.Contains(r.Error, "no longer exists") {
		t.Errorf("result for a missing job: %+v", r)
	}
}

// TestCancelWhileRescued: a job whose worker was SIGKILLed mid-command is
// cancelled: the rescuer that collects the command cancels it, and the job
// ends cancelled, not completed an age later.
func TestCancelWhileRescued(t *testing.T) {
	t.Parallel()
	s := newStack(t, stackOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	a := startWorkerProcess(t, s)
	marker := "boxq-cancel-rescued-" + randID()
	w, e := s.submit(t, ctx, jobs.Job{ID: "cancel-rescued", TaskID: "cr", Command: "BOXQ_TEST_MARK=" + marker + " sleep 60"})
	waitFor(t, 20*time.Second, "the command to start", func() bool { return len(findProcesses(marker)) > 0 })
	killProcess(t, a)
	if err := s.prod.Cancel(ctx, e.ID); err != nil {
		t.Fatal(err)
	}
	s.startWorker(t, nil)
	r, err := w.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != jobs.StatusCancelled || r.ReturnCode != 130 || !r.Rescued {
		t.Errorf("result %+v; want cancelled by the rescuer", r)
	}
	waitFor(t, 10*time.Second, "the command to be killed", func() bool { return len(findProcesses(marker)) == 0 })
}
