// Command enqueue puts boxq exec jobs on the queue and, with -wait, prints
// their results as they finish. It also cancels jobs, reads results and
// terminates a task's sandbox.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/internal/devstack"
	"github.com/boxq/boxq/jobs"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdin, os.Stdout, os.Stderr)
	stop()
	app.Exit("enqueue", err, os.Stderr)
}

const helpHead = `enqueue — put commands on the boxq queue, and wait for their results.

Usage:
  enqueue [flags] -task ID [-wait] -- COMMAND...     one job (the words are joined with spaces, like ssh)
  enqueue [flags] -task ID -stdin-file F -- COMMAND  the same, with F's contents as the command's stdin
                                                     ('-stdin-file -': this program's stdin; stdin is
                                                     never read otherwise, so 'echo hi | enqueue ... -- cat'
                                                     needs -stdin-file -)
  enqueue [flags] -f FILE|- [-wait] [-o FILE]        a JSONL batch, one job per line
  enqueue [flags] -terminate -task ID [-wait]        end a task's sandbox now: its running command and
                                                     its waiting jobs end "cancelled" ("task terminated");
                                                     the sandbox ends once the running command has stopped
  enqueue [flags] -terminate -if-idle -task ID       end it only if no command of the task runs or waits
  enqueue [flags] -cancel JOB_ID                     cancel a job (pending: never runs; running: killed, rc 130);
                                                     exit 1 when it had already finished
  enqueue [flags] -result JOB_ID [-wait]             print a job's result (-wait: wait for it)

A job line: {"id"?, "task_id", "command", "cwd"?, "timeout_s"?: 60, "stdin"?,
"image"?, "cpu"?, "memory_mib"?, "disk_mib"?, "persistent"?: true, "queue"?}.
timeout_s is at most 3600 (the sandbox lifetime); more is rejected.
Commands of one task run one at a time, in the order they were enqueued (a
task's sequence, per queue), in the task's own sandbox, and the shell's
working directory carries from one command to the next. A command that
fails does not stop the task's later commands; to stop a task, -cancel its
waiting jobs or -terminate it. -result of a waiting job says which job has
the turn and how many are ahead.

With -f, the flags -cwd, -timeout, -queue, -image and -persistent, when
given, are the defaults of the lines that lack the field (a line's own field
wins); -task, -id and -stdin-file name one job and are rejected.

With -wait, one job prints the command's output and exits with its return
code (-json: the result object); a batch prints one result line per job on
stdout, in the order they finish, with a progress bar on stderr when it is a
terminal (counts by status, and how many jobs run or wait for capacity, for
their task's turn or for a worker), ends with a summary on stderr (counts by
status and return code, p50/p90 durations), and exits 0 when every job has a
result whose status is not "error". A wait warns when no live worker serves
the jobs' queue, and goes on waiting. Interrupted, it names the jobs that
have no result yet; they go on.

Environment:
  REDIS_URL   default for -redis (redis://127.0.0.1:6379/0)
`

const helpTail = `
Examples:
  # try it on a machine with only Go: embedded Redis, gateway and worker
  go run ./cmd/enqueue -dev -f examples/demo.jsonl -wait
  # one command in task t1's sandbox; the cwd carries to the next job of t1
  enqueue -task t1 -wait -- 'cd /tmp && pwd'
  # piped input: say so with -stdin-file -
  echo hello | enqueue -task t1 -wait -stdin-file - -- cat
  # a batch, results to a file, every line's timeout 5m unless it says
  enqueue -f jobs.jsonl -wait -o results.jsonl -timeout 5m
`

type options struct {
	redisURL  string
	task      string
	cwd       string
	timeout   time.Duration
	stdinFile string
	image     string
	id        string
	queue     string
	wait      bool
	asJSON    bool
	file      string
	out       string
	terminate bool
	ifIdle    bool
	cancel    string
	result    string
	dev       bool
	persist   bool
	retention time.Duration
	maxRetry  int
	logFormat string
	logLevel  string
	command   []string
	// set holds the names of the flags given explicitly.
	set   map[string]bool
	runAt *time.Time // -in, -at (schedule.go)
}

func run(ctx context.Context, args []string, getenv func(string) string, stdin io.Reader, stdout, stderr io.Writer) error {
	var o options
	fs := flag.NewFlagSet("enqueue", flag.ContinueOnError)
	fs.StringVar(&o.redisURL, "redis", app.EnvOr(getenv, "REDIS_URL", "redis://127.0.0.1:6379/0"), "Redis `URL` (env REDIS_URL)")
	fs.StringVar(&o.task, "task", "", "task `ID`: the sandbox the command runs in")
	fs.StringVar(&o.cwd, "cwd", "", "working `dir` for the command (default: where the task's last command left off, else /root); with -f: for lines without cwd")
	o.timeout = jobs.DefaultTimeout
	fs.Var(durationFlag{&o.timeout}, "timeout", "command `timeout`, as in 30s or 5m; at most 1h (the sandbox lifetime); with -f: for lines without timeout_s")
	fs.StringVar(&o.stdinFile, "stdin-file", "", "`file` whose contents are the command's stdin ('-': this program's stdin, which is never read otherwise)")
	fs.StringVar(&o.image, "image", "", "sandbox `image` when the task's sandbox is created (gateway default: python:3.11); with -f: for lines without image")
	fs.StringVar(&o.id, "id", "", "job `ID`; enqueueing the same id twice is one job (default: a new UUID)")
	fs.StringVar(&o.queue, "queue", "", "asynq `queue` (default \"default\"); with -f: for lines without queue")
	fs.BoolVar(&o.wait, "wait", false, "wait for results and print them (with -result: wait for the result; with -terminate: until it is done)")
	fs.BoolVar(&o.asJSON, "json", false, "with one job and -wait: print the result object instead of the output")
	fs.StringVar(&o.file, "f", "", "JSONL batch `file` ('-': stdin)")
	fs.StringVar(&o.out, "o", "", "write result lines to `file` instead of stdout")
	fs.BoolVar(&o.terminate, "terminate", false, "terminate the sandbox of -task now, cancelling its running and waiting commands")
	fs.BoolVar(&o.ifIdle, "if-idle", false, "with -terminate: only if no command of the task runs or waits")
	fs.StringVar(&o.cancel, "cancel", "", "cancel the job with this `ID`")
	fs.StringVar(&o.result, "result", "", "print the result of the job with this `ID`")
	fs.BoolVar(&o.dev, "dev", false, "embedded Redis, gateway and worker in this process: needs nothing installed (implies -wait)")
	fs.BoolVar(&o.persist, "persistent", true, "keep the sandbox's files across its termination, for the task's next sandbox; with -f, given: for lines without persistent")
	o.retention = 24 * time.Hour
	fs.Var(durationFlag{&o.retention}, "retention", "how long results are kept in Redis: a `duration` such as 24h")
	fs.IntVar(&o.maxRetry, "max-retry", 8, "retries after infrastructure faults (capacity waits do not count)")
	fs.StringVar(&o.logFormat, "log-format", "auto", "log format of -dev's embedded worker: auto, text or json")
	fs.StringVar(&o.logLevel, "log-level", "warn", "log level of -dev's embedded worker")
	var x schedOptions
	x.register(fs)
	if err := app.ParseFlags(fs, args, stdout, helpHead+helpScheduling, helpTail); err != nil {
		return err
	}
	o.command = fs.Args()
	o.set = explicitFlags(fs)
	if x.handles() {
		return runScheduling(ctx, &o, &x, stdin, stdout, stderr)
	}
	runAt, err := x.runAt(time.Now())
	if err != nil {
		return err
	}
	o.runAt = runAt
	if o.runAt != nil && o.file != "" {
		return app.Usagef("-in and -at delay one job; in a batch, give each line a \"run_at\"")
	}
	if err := o.check(); err != nil {
		return err
	}
	log, err := app.NewLogger(stderr, o.logFormat, o.logLevel)
	if err != nil {
		return app.Usagef("%v", err)
	}
	app.RouteRedisLogs(log)
	// Read before anything is enqueued: a missing file is a usage error.
	var stdinData *string
	if o.stdinFile == "-" && isTerminalIn(stdin) {
		fmt.Fprintln(stderr, "enqueue: reading the command's stdin from the terminal; end it with Ctrl-D")
	}
	if o.stdinFile != "" {
		b, err := readStdin(o.stdinFile, stdin)
		if err != nil {
			return err
		}
		stdinData = &b
	}

	var worker sync.WaitGroup
	if o.dev {
		stack, stopWorker, err := startDev(ctx, log, &worker)
		if err != nil {
			return err
		}
		defer func() {
			stopWorker()
			worker.Wait()
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			_ = stack.Close(cctx)
		}()
		o.redisURL = stack.RedisURL
		// Everything dies with this process, so there is nothing to come
		// back to later: wait for the results.
		o.wait = true
	}

	rdb, err := app.ConnectRedis(ctx, o.redisURL, 0)
	if err != nil {
		return err
	}
	defer rdb.Close()
	prod, err := jobs.NewProducer(rdb, jobs.ProducerConfig{Retention: o.retention, MaxRetry: o.maxRetry, Logger: log})
	if err != nil {
		return err
	}

	switch {
	case o.terminate:
		return runTerminate(ctx, &o, prod, stderr)
	case o.cancel != "":
		return runCancel(ctx, &o, prod, stderr)
	case o.result != "":
		return runResult(ctx, &o, prod, stdout, stderr)
	case o.file != "":
		return runBatch(ctx, &o, prod, stdin, stdout, stderr)
	default:
		return runOne(ctx, &o, prod, stdinData, stdout, stderr)
	}
}

// check validates the flag combination.
// terminateWait bounds how long -terminate waits to say what a worker did
// (without -wait). A variable for the tests.
var terminateWait = time.Minute

func (o *options) check() error {
	modes := 0
	for _, on := range []bool{o.terminate, o.cancel != "", o.result != "", o.file != ""} {
		if on {
			modes++
		}
	}
	switch {
	case modes > 1:
		return app.Usagef("-terminate, -cancel, -result and -f are different modes: use one")
	case o.terminate && o.task == "":
		return app.Usagef("-terminate needs -task ID")
	case o.ifIdle && !o.terminate:
		return app.Usagef("-if-idle goes with -terminate")
	case o.file != "" && len(o.command) > 0:
		return app.Usagef("with -f the jobs come from the file; drop the command %q", strings.Join(o.command, " "))
	case o.file != "" && rejectPerJob(o.set, "-f") != nil:
		return rejectPerJob(o.set, "-f")
	case modes == 0 && o.task == "":
		return app.Usagef("missing -task ID (or use -f FILE for a batch)")
	case modes == 0 && len(o.command) == 0:
		return app.Usagef("missing command: enqueue -task %s -- COMMAND...", o.task)
	case o.timeout <= 0:
		return app.Usagef("-timeout must be positive, got %v", o.timeout)
	case o.timeout > jobs.MaxTimeout:
		return app.Usagef("-timeout %v is beyond the maximum, %v (the sandbox lifetime)", o.timeout, jobs.MaxTimeout)
	case o.asJSON && o.file != "":
		return app.Usagef("-json is for one job; a batch always prints JSON lines")
	case o.out != "" && o.file == "":
		return app.Usagef("-o is for batches (-f)")
	case o.wait && o.cancel != "":
		return app.Usagef("-cancel does not wait; follow it with -result %s -wait", o.cancel)
	case o.maxRetry < 0 || o.retention <= 0:
		return app.Usagef("-max-retry must not be negative and -retention must be positive")
	}
	return nil
}

// startDev starts the embedded Redis and gateway and a worker on them.
func startDev(ctx context.Context, log *slog.Logger, wg *sync.WaitGroup) (*devstack.Stack, func(), error) {
	stack, err := devstack.Start(log, local.IsolationAuto)
	if err != nil {
		return nil, nil, err
	}
	wctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	ready := make(chan struct{})
	failed := make(chan error, 1)
	wg.Go(func() {
		err := app.RunWorker(wctx, app.WorkerOptions{
			RedisURL: stack.RedisURL, GatewayURL: stack.GatewayURL, Token: stack.Token,
			Concurrency: 64, IdleTTL: 5 * time.Minute, ReapEvery: 30 * time.Second,
			ShutdownTimeout: 2 * time.Second, Logger: log,
			OnReady: func(string) { close(ready) },
		})
		failed <- err
	})
	select {
	case <-ready:
		return stack, stop, nil
	case err := <-failed:
		stop()
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = stack.Close(cctx)
		return nil, nil, fmt.Errorf("dev worker: %w", err)
	}
}

// readStdin reads the -stdin-file (or stdin for "-"), up to the job
// limit. A file that cannot be read is a usage error.
func readStdin(path string, stdin io.Reader) (string, error) {
	var b []byte
	var err error
	if path == "-" {
		b, err = io.ReadAll(io.LimitReader(stdin, jobs.MaxStdinBytes+1))
	} else {
		b, err = readLimited(path, jobs.MaxStdinBytes+1)
	}
	if err != nil {
		return "", app.Usagef("-stdin-file: %v", err)
	}
	return string(b), nil
}

// runOne enqueues the job of the command line and, with -wait, prints its
// output (or its result with -json) and exits with its return code.
func runOne(ctx context.Context, o *options, prod *jobs.Producer, stdinData *string, stdout, stderr io.Writer) error {
	j := jobs.Job{ID: o.id, TaskID: o.task, Command: strings.Join(o.command, " "), Cwd: o.cwd,
		Image: o.image, Queue: o.queue, Persistent: &o.persist, RunAt: o.runAt}
	secs := o.timeout.Seconds()
	j.TimeoutS = &secs
	if stdinData != nil {
		j.Stdin = *stdinData
	}
	if err := j.Validate(); err != nil {
		return app.Usagef("%v", err)
	}
	if !o.wait {
		e, err := prod.Enqueue(ctx, j, "")
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, e.ID)
		if e.Existed {
			fmt.Fprintf(stderr, "job %s was already enqueued; not enqueued again\n", e.ID)
		}
		return nil
	}
	w, err := prod.Subscribe(ctx)
	if err != nil {
		return err
	}
	defer w.Close()
	e, err := prod.Enqueue(ctx, j, w.Channel())
	if err != nil {
		return err
	}
	w.Add(e)
	c := newCollector(prod, w, stderr, nil, e.ID)
	res, err := c.next(ctx)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			err = errInterrupted
		}
		return c.interrupted(err)
	}
	return printOne(o, res, stdout, stderr)
}

// printOne prints a job's result as -wait does: the output (or the result
// object with -json), the error on stderr, and the return code as the exit
// status.
func printOne(o *options, res jobs.Result, stdout, stderr io.Writer) error {
	if o.asJSON {
		if err := writeJSONLine(stdout, res); err != nil {
			return err
		}
	} else {
		fmt.Fprint(stdout, res.Output)
		if res.Error != "" {
			fmt.Fprintf(stderr, "enqueue: job %s: %s\n", res.ID, res.Error)
		}
	}
	if res.ReturnCode != 0 {
		return &app.ExitError{Code: res.ReturnCode}
	}
	return nil
}

// runResult prints a job's result; with -wait it waits for it.
func runResult(ctx context.Context, o *options, prod *jobs.Producer, stdout, stderr io.Writer) error {
	st, err := prod.Status(ctx, o.result)
	if err != nil {
		return err
	}
	if st.State == jobs.StateDone {
		return writeJSONLine(stdout, st.Result)
	}
	if !o.wait {
		return fmt.Errorf("job %s has no result yet: %s (add -wait to wait for it)", o.result, st)
	}
	w, err := prod.Subscribe(ctx)
	if err != nil {
		return err
	}
	defer w.Close()
	w.Add(jobs.Enqueued{ID: o.result, Queue: st.Queue})
	c := newCollector(prod, w, stderr, nil, o.result)
	c.lastState = st.String()
	if st.State != jobs.StateRunning {
		fmt.Fprintf(stderr, "enqueue: job %s: %s\n", o.result, st)
	}
	res, err := c.next(ctx)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			err = errInterrupted
		}
		return c.interrupted(err)
	}
	return writeJSONLine(stdout, res)
}

// runCancel cancels a job, and says when it had already finished (exit 1).
func runCancel(ctx context.Context, o *options, prod *jobs.Producer, stderr io.Writer) error {
	st, err := prod.Status(ctx, o.cancel)
	if err != nil {
		return err
	}
	switch st.State {
	case jobs.StateDone:
		return fmt.Errorf("job %s had already finished (status %s, rc %d); nothing to cancel", o.cancel, st.Result.Status, st.Result.ReturnCode)
	case jobs.StateFailed:
		return fmt.Errorf("job %s had already ended without a result (%s); nothing to cancel", o.cancel, st.LastError)
	}
	if err := prod.Cancel(ctx, o.cancel); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "cancel requested for job %s (it was %s); enqueue -result %s -wait shows its \"cancelled\" result\n", o.cancel, st.State, o.cancel)
	return nil
}

// runTerminate enqueues a terminate and says what a worker did: within
// terminateWait, or, with -wait, whenever it is done.
func runTerminate(ctx context.Context, o *options, prod *jobs.Producer, stderr io.Writer) error {
	id, err := prod.Terminate(ctx, o.task, o.ifIdle)
	if err != nil {
		return err
	}
	waitFor := func(d time.Duration) (jobs.TerminateOutcome, error) {
		wctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		return prod.WaitTerminate(wctx, id)
	}
	out, err := waitFor(workerCheckAfter)
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
		// Not done after a few seconds: say so when no worker is there
		// to do it, and go on waiting.
		if served, serr := prod.QueuesServed(); serr == nil && served[jobs.MaintenanceQueue] == 0 {
			fmt.Fprintln(stderr, "enqueue: no live worker is running to do it; still waiting: start one (worker)")
		} else {
			fmt.Fprintf(stderr, "enqueue: terminate of task %q enqueued (job %s); its sandbox ends once its running command has stopped\n", o.task, id)
		}
		if o.wait {
			out, err = prod.WaitTerminate(ctx, id)
		} else {
			out, err = waitFor(terminateWait - workerCheckAfter)
		}
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil:
		fmt.Fprintf(stderr, "termination of task %q enqueued (job %s); no worker has done it within %v (-wait waits for it)\n", o.task, id, terminateWait)
		return nil
	case errors.Is(err, context.Canceled):
		return fmt.Errorf("interrupted: the termination of task %q (job %s) is enqueued and goes on", o.task, id)
	case err != nil:
		return err
	case out.Status == "busy":
		fmt.Fprintf(stderr, "task %q not terminated: %s\n", o.task, out.Reason)
		return nil
	case out.Status == "none" && o.ifIdle:
		fmt.Fprintf(stderr, "task %q had no sandbox: nothing to terminate\n", o.task)
		return nil
	case out.Status == "none":
		fmt.Fprintf(stderr, "task %q had no sandbox: nothing to terminate (its running and waiting jobs, if any, were cancelled)\n", o.task)
		return nil
	}
	fmt.Fprintf(stderr, "task %q terminated\n", o.task)
	return nil
}

// isTerminalIn reports whether r is a terminal: reading it waits for a
// user to type, which deserves a word.
func isTerminalIn(r io.Reader) bool {
	f, ok := r.(*os.File)
	return ok && app.IsTerminal(f)
}

func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, limit))
}
