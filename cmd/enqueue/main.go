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
  enqueue [flags] -f FILE|- [-wait] [-o FILE]        a JSONL batch, one job per line
  enqueue [flags] -terminate -task ID                end a task's sandbox now: its running command and
                                                     its waiting jobs end "cancelled" ("task terminated")
  enqueue [flags] -terminate -if-idle -task ID       end it only if no command of the task runs or waits
  enqueue [flags] -cancel JOB_ID                     cancel a job (pending: never runs; running: killed, rc 130)
  enqueue [flags] -result JOB_ID                     print a job's result

A job line: {"id"?, "task_id", "command", "cwd"?, "timeout_s"?: 60, "stdin"?,
"image"?, "cpu"?, "memory_mib"?, "disk_mib"?, "persistent"?: true, "queue"?}.
Commands of one task run one at a time, in the order they were enqueued (a
task's sequence, per queue), in the task's own sandbox, and the shell's
working directory carries from one command to the next. A command that
fails does not stop the task's later commands; to stop a task, -cancel its
waiting jobs or -terminate it. -result of a waiting job says which job has
the turn and how many are ahead.

With -wait, one job prints the command's output and exits with its return
code (-json: the result object); a batch prints one result line per job, in
the order they finish, with a progress bar on stderr when it is a terminal,
and exits 0 when every job has a result whose status is not "error".

Environment:
  REDIS_URL   default for -redis (redis://127.0.0.1:6379/0)
`

const helpTail = `
Examples:
  # try it on a machine with only Go: embedded Redis, gateway and worker
  go run ./cmd/enqueue -dev -f examples/demo.jsonl -wait
  # one command in task t1's sandbox; the cwd carries to the next job of t1
  enqueue -task t1 -wait -- 'cd /tmp && ls'
  # a batch, results to a file
  enqueue -f jobs.jsonl -wait -o results.jsonl
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
	runAt     *time.Time // -in, -at (schedule.go)
}

func run(ctx context.Context, args []string, getenv func(string) string, stdin io.Reader, stdout, stderr io.Writer) error {
	var o options
	fs := flag.NewFlagSet("enqueue", flag.ContinueOnError)
	fs.StringVar(&o.redisURL, "redis", app.EnvOr(getenv, "REDIS_URL", "redis://127.0.0.1:6379/0"), "Redis `URL` (env REDIS_URL)")
	fs.StringVar(&o.task, "task", "", "task `ID`: the sandbox the command runs in")
	fs.StringVar(&o.cwd, "cwd", "", "working `dir` for the command (default: where the task's last command left off, else /root)")
	fs.DurationVar(&o.timeout, "timeout", jobs.DefaultTimeout, "command timeout (capped at the sandbox lifetime, 1h)")
	fs.StringVar(&o.stdinFile, "stdin-file", "", "`file` whose contents are the command's stdin ('-': this program's stdin)")
	fs.StringVar(&o.image, "image", "", "sandbox `image` when the task's sandbox is created (gateway default: python:3.11)")
	fs.StringVar(&o.id, "id", "", "job `ID`; enqueueing the same id twice is one job (default: a new UUID)")
	fs.StringVar(&o.queue, "queue", "", "asynq `queue` (default \"default\")")
	fs.BoolVar(&o.wait, "wait", false, "wait for results and print them")
	fs.BoolVar(&o.asJSON, "json", false, "with one job and -wait: print the result object instead of the output")
	fs.StringVar(&o.file, "f", "", "JSONL batch `file` ('-': stdin)")
	fs.StringVar(&o.out, "o", "", "write result lines to `file` instead of stdout")
	fs.BoolVar(&o.terminate, "terminate", false, "terminate the sandbox of -task now, cancelling its running and waiting commands")
	fs.BoolVar(&o.ifIdle, "if-idle", false, "with -terminate: only if no command of the task runs or waits")
	fs.StringVar(&o.cancel, "cancel", "", "cancel the job with this `ID`")
	fs.StringVar(&o.result, "result", "", "print the result of the job with this `ID`")
	fs.BoolVar(&o.dev, "dev", false, "embedded Redis, gateway and worker in this process: needs nothing installed (implies -wait)")
	fs.BoolVar(&o.persist, "persistent", true, "keep the sandbox's files across its termination, for the task's next sandbox")
	fs.DurationVar(&o.retention, "retention", 24*time.Hour, "how long results are kept in Redis")
	fs.IntVar(&o.maxRetry, "max-retry", 8, "retries after infrastructure faults (capacity waits do not count)")
	fs.StringVar(&o.logFormat, "log-format", "auto", "log format of -dev's embedded worker: auto, text or json")
	fs.StringVar(&o.logLevel, "log-level", "warn", "log level of -dev's embedded worker")
	var x schedOptions
	x.register(fs)
	if err := app.ParseFlags(fs, args, stdout, helpHead+helpScheduling, helpTail); err != nil {
		return err
	}
	o.command = fs.Args()
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
		id, err := prod.Terminate(ctx, o.task, o.ifIdle)
		if err != nil {
			return err
		}
		// A worker does it: wait a while for the outcome, and say what
		// happened (or that it is still to come).
		wctx, cancel := context.WithTimeout(ctx, terminateWait)
		defer cancel()
		out, err := prod.WaitTerminate(wctx, id)
		switch {
		case errors.Is(err, context.DeadlineExceeded):
			fmt.Fprintf(stderr, "termination of task %q enqueued (job %s); no worker has done it within %v\n", o.task, id, terminateWait)
			return nil
		case err != nil:
			return err
		case out.Status == "busy":
			fmt.Fprintf(stderr, "task %q not terminated: %s\n", o.task, out.Reason)
			return nil
		}
		fmt.Fprintf(stderr, "task %q terminated\n", o.task)
		return nil
	case o.cancel != "":
		if err := prod.Cancel(ctx, o.cancel); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "cancel requested for job %s\n", o.cancel)
		return nil
	case o.result != "":
		res, state, ok, err := prod.Lookup(ctx, o.result)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("job %s has no result yet (state: %s)", o.result, state)
		}
		return writeJSONLine(stdout, res)
	case o.file != "":
		return runBatch(ctx, &o, prod, stdin, stdout, stderr)
	default:
		return runOne(ctx, &o, prod, stdin, stdout, stderr)
	}
}

// check validates the flag combination.
// terminateWait bounds how long -terminate waits to say what a worker did.
const terminateWait = time.Minute

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
	case o.file != "" && o.task != "":
		return app.Usagef("with -f each line names its task_id; drop -task")
	case modes == 0 && o.task == "":
		return app.Usagef("missing -task ID (or use -f FILE for a batch)")
	case modes == 0 && len(o.command) == 0:
		return app.Usagef("missing command: enqueue -task %s -- COMMAND...", o.task)
	case o.timeout <= 0:
		return app.Usagef("-timeout must be positive, got %v", o.timeout)
	case o.asJSON && o.file != "":
		return app.Usagef("-json is for one job; a batch always prints JSON lines")
	case o.out != "" && o.file == "":
		return app.Usagef("-o is for batches (-f)")
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

// runOne enqueues the job of the command line and, with -wait, prints its
// output (or its result with -json) and exits with its return code.
func runOne(ctx context.Context, o *options, prod *jobs.Producer, stdin io.Reader, stdout, stderr io.Writer) error {
	j := jobs.Job{ID: o.id, TaskID: o.task, Command: strings.Join(o.command, " "), Cwd: o.cwd,
		Image: o.image, Queue: o.queue, Persistent: &o.persist, RunAt: o.runAt}
	secs := o.timeout.Seconds()
	j.TimeoutS = &secs
	if o.stdinFile != "" {
		var b []byte
		var err error
		if o.stdinFile == "-" {
			b, err = io.ReadAll(io.LimitReader(stdin, jobs.MaxStdinBytes+1))
		} else {
			b, err = readLimited(o.stdinFile, jobs.MaxStdinBytes+1)
		}
		if err != nil {
			return fmt.Errorf("-stdin-file: %w", err)
		}
		j.Stdin = string(b)
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
	res, err := w.Next(ctx)
	if err != nil {
		return fmt.Errorf("waiting for job %s: %w (it goes on; read its result later with -result %s)", e.ID, err, e.ID)
	}
	if o.asJSON {
		if err := writeJSONLine(stdout, res); err != nil {
			return err
		}
	} else {
		fmt.Fprint(stdout, res.Output)
		if res.Status == jobs.StatusError || res.Status == jobs.StatusTimeout {
			fmt.Fprintf(stderr, "enqueue: job %s: %s\n", res.ID, res.Error)
		}
	}
	if res.ReturnCode != 0 {
		return &app.ExitError{Code: res.ReturnCode}
	}
	return nil
}

func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, limit))
}
