package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/jobs"
)

// childEnv, set to "worker", makes the bench binary a worker process: the
// worker-memory measurement re-executes the bench so that it measures a
// worker alone, not a process that also holds Redis clients, gateways and
// samples.
const (
	childEnv            = "BOXQ_BENCH_CHILD"
	childConcurrencyEnv = "BOXQ_BENCH_CONCURRENCY"
)

// runWorkerChild is the worker process: the same wiring as cmd/worker.
func runWorkerChild(ctx context.Context, getenv func(string) string, stderr io.Writer) error {
	conc, err := strconv.Atoi(getenv(childConcurrencyEnv))
	if err != nil {
		return fmt.Errorf("%s: %w", childConcurrencyEnv, err)
	}
	return app.RunWorker(ctx, app.WorkerOptions{
		RedisURL:    getenv("REDIS_URL"),
		GatewayURL:  getenv("GATEWAY_URL"),
		Token:       getenv("GATEWAY_TOKEN"),
		Concurrency: conc,
		IdleTTL:     time.Hour,
		ReapEvery:   time.Hour,
		Logger:      slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
}

// rssResult is the worker-memory measurement.
type rssResult struct {
	mib      float64 // the largest VmRSS seen with inflight execs running
	inflight int     // execs running at the gateway then: n, or the most seen at once
	note     string  // set when not all n ran at once
}

// workerRSS starts a worker process with concurrency n, runs one `true`
// job in each of n tasks (so that their sandboxes exist), then n jobs of
// `sleep <hold>` at once, and reads the worker's resident memory while all
// n execs are running at the gateway. It returns the largest VmRSS seen
// then, in MiB.
//
// On a loaded machine the first sleeps may end before the last start. The
// bench then tries once more with twice the hold, and if that falls short
// too, it reports the memory at the most execs it saw running at once,
// and says so: a number that is there, labelled, beats a failed run.
func (e *env) workerRSS(ctx context.Context, n int, hold time.Duration) (rssResult, error) {
	exe, err := os.Executable()
	if err != nil {
		return rssResult{}, err
	}
	db := e.db()
	prdb, err := e.redis.client(ctx, db, 0)
	if err != nil {
		return rssResult{}, err
	}
	defer prdb.Close()
	prod, err := jobs.NewProducer(prdb, jobs.ProducerConfig{})
	if err != nil {
		return rssResult{}, err
	}

	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cmd := exec.CommandContext(cctx, exe)
	cmd.Env = append(os.Environ(),
		childEnv+"=worker",
		childConcurrencyEnv+"="+strconv.Itoa(n),
		"REDIS_URL="+e.redis.url(db),
		"GATEWAY_URL="+e.gw.url,
		"GATEWAY_TOKEN="+e.token,
	)
	stderr := &tailBuffer{max: 8 << 10}
	cmd.Stdout, cmd.Stderr = io.Discard, stderr
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	if err := cmd.Start(); err != nil {
		return rssResult{}, fmt.Errorf("start worker process: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cancel()
		<-exited
	}()
	childFailed := func(err error) error {
		select {
		case werr := <-exited:
			exited <- werr
			return fmt.Errorf("worker process exited (%v): %s", werr, strings.TrimSpace(stderr.String()))
		default:
			return err
		}
	}

	prefix := "rss-" + uuid.NewString()[:8] + "-"
	batch := func(command string) []jobs.Job {
		js := make([]jobs.Job, n)
		for i := range js {
			js[i] = jobs.Job{ID: uuid.NewString(), TaskID: fmt.Sprintf("%s%d", prefix, i), Command: command}
		}
		return js
	}
	begin := time.Now()
	if _, err := runBatch(ctx, prod, batch("true")); err != nil {
		return rssResult{}, childFailed(err)
	}
	e.progress("worker memory: %d sandboxes ready in %v; worker at %.1f MiB", n, time.Since(begin).Round(time.Millisecond), rssMiB(cmd.Process.Pid))

	gw, err := e.client(e.gw)
	if err != nil {
		return rssResult{}, err
	}
	// attempt runs n `sleep d` jobs and samples the worker's memory until
	// they are done: the largest VmRSS seen while the most execs seen at
	// once were running.
	attempt := func(d time.Duration) (rssResult, error) {
		var (
			best rssResult
			res  = make(chan error, 1)
		)
		// The jobs are waited for under cctx: an early return below ends
		// the wait along with the worker.
		go func() {
			_, err := runBatch(cctx, prod, batch(fmt.Sprintf("sleep %g", d.Seconds())))
			res <- err
		}()
		for {
			select {
			case err := <-res:
				if err != nil {
					return rssResult{}, childFailed(err)
				}
				return best, nil
			default:
			}
			sbs, err := gw.List(ctx)
			if err != nil {
				cancel()
				<-res
				return rssResult{}, err
			}
			running := 0
			for _, sb := range sbs {
				if strings.HasPrefix(sb.LogicalKey, prefix) {
					running += sb.RunningExecs
				}
			}
			if running > best.inflight {
				best = rssResult{inflight: running}
			}
			if running > 0 && running == best.inflight {
				best.mib = max(best.mib, rssMiB(cmd.Process.Pid))
			}
			if !pause(ctx, 20*time.Millisecond) {
				cancel()
				<-res
				return rssResult{}, ctx.Err()
			}
		}
	}
	got, err := attempt(hold)
	if err != nil || got.inflight >= n {
		return got, err
	}
	e.progress("worker memory: saw at most %d of %d execs running at once; once more, with each running %v", got.inflight, n, 2*hold)
	again, err := attempt(2 * hold)
	if err != nil || again.inflight >= n {
		return again, err
	}
	if again.inflight > got.inflight {
		got = again
	}
	got.note = fmt.Sprintf("worker memory: never saw %d execs running at once (at most %d, holding them %v, then %v); measured at %d in flight",
		n, got.inflight, hold, 2*hold, got.inflight)
	return got, nil
}

// rssMiB returns the resident memory of process pid in MiB (0 if unknown).
func rssMiB(pid int) float64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				return 0
			}
			return kb / 1024
		}
	}
	return 0
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf bytes.Buffer
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf.Write(p)
	if over := t.buf.Len() - t.max; over > 0 {
		t.buf.Next(over)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.buf.String()
}
