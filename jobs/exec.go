package jobs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"time"

	"github.com/hibiken/asynq"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/sandboxpool"
	"github.com/boxq/boxq/wrap"
)

// Pool is what the handlers need of sandboxpool.Pool.
type Pool interface {
	Acquire(ctx context.Context, taskID string, spec sandboxpool.Spec, execID string) (*sandboxpool.Lease, error)
	Release(ctx context.Context, l *sandboxpool.Lease, cwd string) error
	Abandon(ctx context.Context, l *sandboxpool.Lease) error
	Recreate(ctx context.Context, l *sandboxpool.Lease) error
	Terminate(ctx context.Context, taskID string) error
	ReapIdle(ctx context.Context, now time.Time, ttl time.Duration) (int, error)
}

// Gateway is what the handlers need of gateway.Client.
type Gateway interface {
	Run(ctx context.Context, sandboxID string, req gateway.StartRequest) (gateway.ExecState, error)
	PollExec(ctx context.Context, sandboxID, execID string, wait time.Duration) (gateway.ExecState, error)
}

// ExecHandler runs TypeExec tasks: it borrows the task's sandbox, runs the
// wrapped command through the gateway, and records the result and the new
// cwd.
type ExecHandler struct {
	pool      Pool
	gw        Gateway
	store     store
	log       *slog.Logger
	now       func() time.Time
	stopping  <-chan struct{}
	maxOutput int
	metrics   *Metrics
	// gatewayIdle is the idleTimeoutMs asked of the gateway (0: its default).
	gatewayIdle time.Duration
}

// ProcessTask implements asynq.Handler.
//
// A command's exit code, timeout (124) or cancellation (130) is a result,
// not an error. Errors returned here are one of: bad input or a permanent
// gateway answer (asynq.SkipRetry, result "error" written), a capacity wait
// (*retryLater: not counted as a failure), or an infrastructure fault
// (retried; on the last attempt the result "error" is written first).
func (h *ExecHandler) ProcessTask(ctx context.Context, t *asynq.Task) error {
	h.metrics.addInFlight(1)
	defer h.metrics.addInFlight(-1)
	startedAt := h.now()
	jobID, _ := asynq.GetTaskID(ctx)
	queue, _ := asynq.GetQueueName(ctx)
	retried, _ := asynq.GetRetryCount(ctx)
	maxRetry, _ := asynq.GetMaxRetry(ctx)

	var p ExecPayload
	res := Result{ID: jobID, ExecID: ExecID(jobID), Attempts: retried + 1, StartedAt: startedAt}
	if err := json.Unmarshal(t.Payload(), &p); err != nil {
		return h.finalError(ctx, queue, "", &res, fmt.Errorf("invalid job: %w", describeJSONError(err)))
	}
	res.TaskID = p.TaskID
	if p.QueuedAtMs > 0 {
		res.QueuedAt = time.UnixMilli(p.QueuedAtMs).UTC()
		h.metrics.observeQueueWait(startedAt.Sub(res.QueuedAt))
	}
	log := h.log.With("job_id", jobID, "task_id", p.TaskID)
	if err := p.Validate(); err != nil {
		log.Info("rejected job", "err", err)
		return h.finalError(ctx, queue, p.Notify, &res, err)
	}

	prev, cancelled, err := h.store.deliveryState(ctx, queue, jobID)
	if err != nil {
		return err
	}
	if prev != nil {
		// An earlier delivery finished this job; asynq just did not hear
		// of it (a crash between the result write and the ack). Publish the
		// same result again for a producer that may be waiting.
		log.Info("result already recorded; not running the command again")
		return h.store.writeResult(ctx, queue, jobID, p.Notify, prev)
	}
	if cancelled {
		res.Status, res.ReturnCode, res.Error = StatusCancelled, gateway.ReturnCodeCancelled, "cancelled before it ran"
		return h.finish(ctx, queue, p.Notify, &res)
	}

	acquireStart := time.Now()
	lease, err := h.pool.Acquire(ctx, p.TaskID, h.specOf(&p.Job), res.ExecID)
	h.metrics.observeAcquire(time.Since(acquireStart))
	if err != nil {
		return h.failure(ctx, queue, p.Notify, &res, retried, maxRetry, fmt.Errorf("acquire sandbox: %w", err))
	}
	log = log.With("sandbox_id", lease.SandboxID())
	res.SandboxID = lease.SandboxID()

	if prev := lease.PrevExecID(); prev != "" && prev != res.ExecID {
		// A previous holder of this task's sandbox stopped waiting for its
		// exec (crash or shutdown). Commands of one task never overlap, so
		// wait for that exec to end before starting ours.
		if err := h.waitForExec(ctx, lease.SandboxID(), prev); err != nil {
			h.abandon(ctx, log, lease)
			return h.failure(ctx, queue, p.Notify, &res, retried, maxRetry, err)
		}
	}

	// The marker nonce is fixed at enqueue, so a re-delivery parses the
	// output of the exec it re-attaches to. Payloads written by other
	// producers may lack it: derive one from the job id then.
	nonce := p.Nonce
	if nonce == "" {
		sum := sha256.Sum256([]byte("boxq-marker:" + jobID))
		nonce = hex.EncodeToString(sum[:12])
	}
	marker := wrap.Marker(nonce)
	cwd := firstNonEmpty(p.Cwd, lease.Cwd(), lease.Spec().WithDefaults().Cwd)

	runCtx, cancelRun := h.runContext(ctx)
	defer cancelRun(nil)
	execStart := time.Now()
	st, err := h.gw.Run(runCtx, lease.SandboxID(), h.startRequest(&p, res.ExecID, cwd, marker))
	if errors.Is(err, gateway.ErrSandboxGone) {
		// The sandbox was reaped, outlived its lifetime, or the gateway
		// restarted. Create a new one and run once more there.
		log.Warn("sandbox is gone; recreating it", "err", err)
		if rerr := h.pool.Recreate(ctx, lease); rerr != nil {
			// Classify by the create's failure (a capacity wait or a fault
			// comes back later; a permanent answer ends the job), and say
			// what started it.
			err = fmt.Errorf("%w (recreating it after: %v)", rerr, err)
		} else {
			res.SandboxRecreated = true
			res.SandboxID = lease.SandboxID()
			log = log.With("sandbox_id", lease.SandboxID())
			cwd = firstNonEmpty(p.Cwd, lease.Spec().WithDefaults().Cwd)
			st, err = h.gw.Run(runCtx, lease.SandboxID(), h.startRequest(&p, res.ExecID, cwd, marker))
		}
	}
	h.metrics.observeExec(time.Since(execStart))
	if errors.Is(err, gateway.ErrDetached) {
		// The worker is shutting down and asynq has put the job back. The
		// exec goes on; the next delivery re-attaches to it.
		log.Info("worker stopping; leaving the exec running for the next delivery")
		h.abandon(ctx, log, lease)
		return err
	}
	if err != nil {
		h.release(ctx, log, lease, "")
		return h.failure(ctx, queue, p.Notify, &res, retried, maxRetry, fmt.Errorf("run command: %w", err))
	}

	clean, newCwd := wrap.Parse(st.Output, marker)
	h.release(ctx, log, lease, newCwd)

	res.Status, res.ReturnCode = resultStatus(st)
	res.Output, res.Truncated, res.OutputBytes = capOutput(clean, h.maxOutput)
	res.Cwd = firstNonEmpty(newCwd, cwd)
	if st.Status == gateway.StatusTimeout {
		res.Error = fmt.Sprintf("command timed out after %s", p.Timeout())
	}
	log.Debug("exec finished", "status", res.Status, "returncode", res.ReturnCode, "exec_id", res.ExecID)
	return h.finish(ctx, queue, p.Notify, &res)
}

// runContext returns the context the gateway loop runs under. When the
// job's context ends, it ends too, with cause ErrDetached if the worker is
// shutting down (leave the exec running) and context.Canceled otherwise
// (CancelProcessing: cancel the exec).
func (h *ExecHandler) runContext(ctx context.Context) (context.Context, context.CancelCauseFunc) {
	runCtx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
		select {
		case <-h.stopping:
			cancel(gateway.ErrDetached)
		default:
			cancel(context.Canceled)
		}
	})
	return runCtx, func(cause error) { stop(); cancel(cause) }
}

func (h *ExecHandler) startRequest(p *ExecPayload, execID, cwd, marker string) gateway.StartRequest {
	return gateway.StartRequest{
		ExecID:    execID,
		Command:   wrap.Command(p.Command, cwd, marker),
		TimeoutMs: p.Timeout().Milliseconds(),
		StdinData: p.Stdin,
	}
}

// waitForExec waits until an exec left behind by an earlier lease holder
// has ended (or the gateway no longer knows it).
func (h *ExecHandler) waitForExec(ctx context.Context, sandboxID, execID string) error {
	for {
		st, err := h.gw.PollExec(ctx, sandboxID, execID, 10*time.Second)
		switch {
		case errors.Is(err, gateway.ErrExecNotFound), err == nil && gateway.Terminal(st.Status):
			return nil
		case err != nil && gateway.Classify(err) == gateway.Permanent:
			return fmt.Errorf("wait for previous exec %s: %w", execID, err)
		case ctx.Err() != nil:
			return ctx.Err()
		case err != nil:
			t := time.NewTimer(100 * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
		}
	}
}

// release frees the lease with the new cwd. A stale lease means another
// holder took over after ours expired: nothing to undo, but worth a log.
func (h *ExecHandler) release(ctx context.Context, log *slog.Logger, l *sandboxpool.Lease, cwd string) {
	if err := h.pool.Release(ctx, l, cwd); err != nil {
		log.Warn("release sandbox lease failed", "err", err)
	}
}

func (h *ExecHandler) abandon(ctx context.Context, log *slog.Logger, l *sandboxpool.Lease) {
	if err := h.pool.Abandon(ctx, l); err != nil {
		log.Warn("abandon sandbox lease failed", "err", err)
	}
}

// finish writes the result (and publishes it) and records its metrics.
func (h *ExecHandler) finish(ctx context.Context, queue, notify string, res *Result) error {
	res.FinishedAt = h.now()
	if !res.StartedAt.IsZero() {
		res.DurationMs = res.FinishedAt.Sub(res.StartedAt).Milliseconds()
	}
	data, err := json.Marshal(res)
	if err != nil {
		return fmt.Errorf("jobs: encode result: %w", err)
	}
	if err := h.store.writeResult(ctx, queue, res.ID, notify, data); err != nil {
		return err
	}
	h.metrics.observeResult(res)
	return nil
}

// finalError records a result with status "error" and ends the job without
// retries.
func (h *ExecHandler) finalError(ctx context.Context, queue, notify string, res *Result, cause error) error {
	res.Status, res.ReturnCode, res.Error = StatusError, 1, cause.Error()
	if err := h.finish(ctx, queue, notify, res); err != nil {
		return err // not recorded: let asynq retry, so the answer is not lost
	}
	return fmt.Errorf("%w: %w", cause, asynq.SkipRetry)
}

// failure decides, in one place, what a failed attempt becomes.
func (h *ExecHandler) failure(ctx context.Context, queue, notify string, res *Result, retried, maxRetry int, err error) error {
	h.metrics.observeGatewayError(err)
	switch {
	case errors.Is(err, sandboxpool.ErrBusy):
		return &retryLater{err: err, after: 200 * time.Millisecond}
	case gateway.Classify(err) == gateway.Capacity && gateway.StatusCode(err) != 0:
		return &retryLater{err: err, after: max(gateway.RetryAfter(err), 500*time.Millisecond)}
	case gateway.StatusCode(err) != 0 && gateway.Classify(err) == gateway.Permanent:
		return h.finalError(ctx, queue, notify, res, err)
	case errors.Is(err, gateway.ErrExecNotFound):
		// The gateway forgot the exec (restart, or a re-delivery later than
		// its retention). Running it again could run the command twice.
		return h.finalError(ctx, queue, notify, res, fmt.Errorf("%w (the gateway lost track of it; not run again so it cannot run twice)", err))
	case ctx.Err() != nil:
		return ctx.Err()
	case retried >= maxRetry:
		return h.finalError(ctx, queue, notify, res, fmt.Errorf("giving up after %d attempts: %w", retried+1, err))
	}
	return err
}

// retryLater is a capacity wait: the job comes back after `after` and the
// attempt does not count as a failure.
type retryLater struct {
	err   error
	after time.Duration
}

func (e *retryLater) Error() string { return "retry later: " + e.err.Error() }
func (e *retryLater) Unwrap() error { return e.err }

func resultStatus(st gateway.ExecState) (string, int) {
	switch st.Status {
	case gateway.StatusTimeout:
		return StatusTimeout, gateway.ReturnCodeTimeout
	case gateway.StatusCancelled:
		return StatusCancelled, gateway.ReturnCodeCancelled
	}
	return StatusCompleted, st.RC()
}

// omittedLine is how the reference gateway marks output it cut; capOutput
// writes the same line, so one parser reads both.
var omittedLine = regexp.MustCompile(`\n\[\.\.\. (\d+) bytes omitted \.\.\.\]\n`)

// capOutput keeps at most limit bytes of out (head and tail) and reports
// whether anything was cut, by the gateway or here, and the size of the
// command's whole output.
func capOutput(out string, limit int) (string, bool, int) {
	total := len(out)
	truncated := false
	if m := omittedLine.FindAllStringSubmatchIndex(out, -1); len(m) > 0 {
		last := m[len(m)-1]
		if n, err := strconv.Atoi(out[last[2]:last[3]]); err == nil {
			total += n - (last[1] - last[0])
			truncated = true
		}
	}
	if limit > 0 && len(out) > limit {
		head, tail := out[:limit/2], out[len(out)-(limit-limit/2):]
		omitted := len(out) - len(head) - len(tail)
		if !truncated {
			total = len(out)
		}
		out = head + "\n[... " + strconv.Itoa(omitted) + " bytes omitted ...]\n" + tail
		truncated = true
	}
	return out, truncated, total
}

// specOf is the sandbox spec of a job. The gateway's own idle timeout is
// set past the pool's idle TTL plus two reaper ticks, so the reaper, which
// snapshots persistent sandboxes, gets there first; the gateway's timeout
// only ends sandboxes that no worker reaps (every worker gone).
func (h *ExecHandler) specOf(j *Job) sandboxpool.Spec {
	persistent := true
	if j.Persistent != nil {
		persistent = *j.Persistent
	}
	return sandboxpool.Spec{
		Image:         j.Image,
		CPU:           j.CPU,
		MemoryMiB:     j.MemoryMiB,
		DiskMiB:       j.DiskMiB,
		Persistent:    persistent,
		IdleTimeoutMs: h.gatewayIdle.Milliseconds(),
	}
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}
