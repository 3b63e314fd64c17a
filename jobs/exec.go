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
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/sandboxpool"
	"github.com/boxq/boxq/wrap"
)

// Pool is what the handlers need of sandboxpool.Pool.
type Pool interface {
	AcquireUnless(ctx context.Context, taskID string, spec sandboxpool.Spec, execID string, unless []sandboxpool.Check) (*sandboxpool.Lease, error)
	Release(ctx context.Context, l *sandboxpool.Lease, cwd string) error
	ReleaseWith(ctx context.Context, l *sandboxpool.Lease, cwd string, also func(redis.Pipeliner)) error
	Abandon(ctx context.Context, l *sandboxpool.Lease) error
	Yield(ctx context.Context, l *sandboxpool.Lease) error
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
	cancels   *cancelWatch // cancels asked by asynq clients (the dashboard)
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
	if !utf8.Valid(t.Payload()) {
		// Decoding turned the bad bytes into U+FFFD: not the job written.
		return h.finalError(ctx, queue, p.Notify, &res, errors.New("invalid job: the payload is not valid UTF-8"))
	}
	if p.QueuedAtMs > 0 {
		res.QueuedAt = time.UnixMilli(p.QueuedAtMs).UTC()
		h.metrics.observeQueueWait(startedAt.Sub(res.QueuedAt))
	}
	log := h.log.With("job_id", jobID, "task_id", p.TaskID)
	if err := p.Validate(); err != nil {
		log.Info("rejected job", "err", err)
		return h.finalError(ctx, queue, p.Notify, &res, err)
	}

	// What a delivery must check first (a result already written, a cancel
	// request) rides along with the take of the lease: one round trip to
	// Redis on the common path; the veto is the rare one.
	acquireStart := time.Now()
	ordered := p.AfterID == "" || res.QueuedAt.IsZero() || startedAt.Sub(res.QueuedAt) < orderWait
	if !ordered {
		log.Warn("waited too long for the task's earlier job; running without waiting for it", "after_job_id", p.AfterID, "waited", startedAt.Sub(res.QueuedAt).Round(time.Second))
	}
	lease, err := h.pool.AcquireUnless(ctx, p.TaskID, h.specOf(&p.Job), res.ExecID, h.store.deliveryChecks(queue, jobID, &p, ordered))
	h.metrics.observeAcquire(time.Since(acquireStart))
	if errors.Is(err, sandboxpool.ErrVetoed) {
		return h.vetoed(ctx, log, queue, p.Notify, &res)
	}
	if err != nil {
		return h.failure(ctx, queue, p.Notify, &res, retried, maxRetry, fmt.Errorf("acquire sandbox: %w", err))
	}
	log = log.With("sandbox_id", lease.SandboxID())
	res.SandboxID = lease.SandboxID()

	// Previous holders of this task's sandbox stopped waiting for their
	// execs (crash or shutdown). Commands of one task never overlap, so
	// wait for those execs to end before starting ours.
	for _, prev := range lease.PrevExecIDs() {
		if err := h.waitForExec(ctx, lease.SandboxID(), prev); err != nil {
			// Ours never started; the previous one may still run: hand the
			// next holder the wait (reliability.TestWorkerSIGTERM).
			if yerr := h.pool.Yield(ctx, lease); yerr != nil {
				log.Warn("yield sandbox lease failed", "err", yerr)
			}
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
	// No cwd known: no cd at all, so the command starts in the sandbox's
	// default cwd as the gateway sets it. (Spelling out "/root" would be the
	// same under isolation, but a gateway without isolation maps only its
	// own default to the sandbox's directory, not a path a script cds to.)
	cwd := firstNonEmpty(p.Cwd, lease.Cwd())

	runCtx, cancelRun := h.runContext(ctx, jobID)
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
			cwd = p.Cwd
			st, err = h.gw.Run(runCtx, lease.SandboxID(), h.startRequest(&p, res.ExecID, cwd, marker))
		}
	}
	h.metrics.observeExec(time.Since(execStart))
	if errors.Is(err, gateway.ErrDetached) {
		// The worker is shutting down and asynq has put the job back. The
		// exec goes on; the next delivery re-attaches to it.
		if stoppingNow(h.stopping) {
			log.Info("worker stopping; leaving the exec running for the next delivery")
		} else {
			log.Warn("asynq stopped waiting for the job (its lease lapsed: Redis unreachable?); leaving the exec running for the next delivery")
		}
		h.abandon(ctx, log, lease)
		return err
	}
	if err != nil {
		ret := h.failure(ctx, queue, p.Notify, &res, retried, maxRetry, fmt.Errorf("run command: %w", err))
		if errors.Is(ret, asynq.SkipRetry) {
			// The job has its final answer: nothing comes back for the exec.
			h.release(ctx, log, lease, "")
		} else {
			// The job comes back, and its start may have reached the
			// gateway (an answer lost, then a refusal): leave the exec
			// marked in flight, so the task's next command waits for it
			// and the job's next delivery re-attaches to it
			// (reliability.TestStartAnswerLostThenRefused).
			h.abandon(ctx, log, lease)
		}
		return ret
	}

	clean, newCwd := wrap.Parse(st.Output, marker)
	res.Status, res.ReturnCode = resultStatus(st)
	res.Output, res.Truncated, res.OutputBytes = capOutput(clean, h.maxOutput, st.OutputOmitted)
	res.OutputInvalidUTF8 = strings.ContainsRune(clean, utf8.RuneError) || !utf8.ValidString(clean)
	// A command that exits the shell, times out or is killed reports no
	// cwd: it is where the command started, or the sandbox's default.
	res.Cwd = firstNonEmpty(newCwd, cwd, lease.Spec().WithDefaults().Cwd)
	if st.Status == gateway.StatusTimeout {
		res.Error = fmt.Sprintf("command timed out after %s", p.Timeout())
	}
	log.Debug("exec finished", "status", res.Status, "returncode", res.ReturnCode, "exec_id", res.ExecID)
	return h.releaseAndFinish(ctx, log, lease, newCwd, queue, p.Notify, &res)
}

// vetoed ends a delivery that found, before it took the sandbox, that the
// job has a result already or was cancelled.
func (h *ExecHandler) vetoed(ctx context.Context, log *slog.Logger, queue, notify string, res *Result) error {
	prev, cancelled, err := h.store.deliveryState(ctx, queue, res.ID)
	switch {
	case err != nil:
		return err
	case prev != nil:
		// An earlier delivery finished this job; asynq just did not hear
		// of it (a crash between the result write and the ack). Publish the
		// same result again for a producer that may be waiting.
		log.Info("result already recorded; not running the command again")
		return h.store.writeResult(ctx, queue, res.ID, notify, prev)
	case cancelled:
		res.Status, res.ReturnCode, res.Error = StatusCancelled, gateway.ReturnCodeCancelled, "cancelled before it ran"
		return h.finish(ctx, queue, notify, res)
	}
	return fmt.Errorf("jobs: delivery of %s was held back by a mark that is gone now; trying again", res.ID)
}

// runContext returns the context the gateway loop runs under. When the
// job's context ends, it ends too: with cause context.Canceled, which
// cancels the exec, when the job was cancelled or ran past asynq's
// deadline; with cause ErrDetached, which leaves the exec running for the
// job's next delivery to re-attach to, when the worker is shutting down or
// asynq lost the job's lease (Redis unreachable for longer than its 30 s:
// it will deliver the job again, a reason to wait, not to kill the command;
// reliability.TestRedisOutageLongerThanLease).
//
// A job was cancelled when Producer.Cancel flagged it (before it cancelled
// the context), or when asynq's CancelProcessing, which is what the
// dashboard's Cancel button calls, asked for it (cancelWatch;
// TestCancelFromDashboard). Otherwise the exec is left running: a wrong
// detach costs a re-attach, a wrong cancel a command.
func (h *ExecHandler) runContext(ctx context.Context, jobID string) (context.Context, context.CancelCauseFunc) {
	runCtx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
		if stoppingNow(h.stopping) {
			cancel(gateway.ErrDetached)
			return
		}
		if errors.Is(ctx.Err(), context.DeadlineExceeded) || h.store.cancelRequested(ctx, jobID) || h.cancels.requested(jobID, cancelHeardWait) {
			cancel(context.Canceled)
			return
		}
		cancel(gateway.ErrDetached)
	})
	return runCtx, func(cause error) { stop(); cancel(cause) }
}

// cancelMarkTTL is how long the mark of a job cancelled from the dashboard
// is kept: as long as results are by default.
const cancelMarkTTL = 24 * time.Hour

// orderWait bounds how long a job waits for the job enqueued before it for
// its task: past it (that job stuck in a queue no worker serves, in long
// retries, or a loop left by a failed enqueue that was sent again) the job
// runs without it. The task's commands still never overlap: the lease sees
// to that.
const orderWait = 10 * time.Minute

// cancelHeardWait is how long a job whose context ended waits to hear that
// it was cancelled: asynq's subscriber, which ended the context, and the
// worker's cancelWatch get the same message at about the same time.
const cancelHeardWait = 2 * time.Second

// stoppingNow reports whether the worker is shutting down.
func stoppingNow(stopping <-chan struct{}) bool {
	select {
	case <-stopping:
		return true
	default:
		return false
	}
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
	data, err := h.encode(res)
	if err != nil {
		return err
	}
	if err := h.store.writeResult(ctx, queue, res.ID, notify, data); err != nil {
		return err
	}
	h.metrics.observeResult(res)
	return nil
}

// releaseAndFinish releases the lease with the new cwd and then writes the
// result, in one round trip to Redis: the release goes first, so that a
// producer that reads the result and enqueues the task's next command
// finds the task's sandbox free.
func (h *ExecHandler) releaseAndFinish(ctx context.Context, log *slog.Logger, l *sandboxpool.Lease, cwd, queue, notify string, res *Result) error {
	data, err := h.encode(res)
	if err != nil {
		h.release(ctx, log, l, cwd)
		return err
	}
	var write *redis.Cmd
	if err := h.pool.ReleaseWith(ctx, l, cwd, func(pipe redis.Pipeliner) {
		write = h.store.queueResult(ctx, pipe, queue, res.ID, notify, data)
	}); err != nil {
		log.Warn("release sandbox lease failed", "err", err)
	}
	if err := write.Err(); err != nil {
		return fmt.Errorf("jobs: write result of %s: %w", res.ID, err)
	}
	h.metrics.observeResult(res)
	return nil
}

// encode stamps the result's end and encodes it.
func (h *ExecHandler) encode(res *Result) ([]byte, error) {
	res.FinishedAt = h.now()
	if !res.StartedAt.IsZero() {
		res.DurationMs = res.FinishedAt.Sub(res.StartedAt).Milliseconds()
	}
	data, err := json.Marshal(res)
	if err != nil {
		return nil, fmt.Errorf("jobs: encode result: %w", err)
	}
	return data, nil
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
	case errors.Is(err, gateway.ErrExecNotFound):
		// The gateway forgot the exec (restart, the sandbox ended, or a
		// re-delivery later than its retention). Running it again could
		// run the command twice. (Before the permanent case: a 404 is one.)
		return h.finalError(ctx, queue, notify, res, fmt.Errorf("%w (the gateway lost track of the command: it restarted, or the sandbox ended; its outcome is unknown, and it is not run again so that it cannot run twice)", err))
	case gateway.StatusCode(err) != 0 && gateway.Classify(err) == gateway.Permanent:
		return h.finalError(ctx, queue, notify, res, err)
	case ctx.Err() != nil:
		// Stopped while waiting (for the task's lease, or an exec left
		// running): by a cancel from an asynq client (the dashboard), mark
		// the job as Producer.Cancel does, so that its next delivery ends
		// it cancelled rather than running it.
		if !stoppingNow(h.stopping) && !errors.Is(ctx.Err(), context.DeadlineExceeded) && h.cancels.requested(res.ID, cancelHeardWait) {
			if merr := h.store.markCancelled(context.WithoutCancel(ctx), res.ID, cancelMarkTTL); merr != nil {
				h.log.Warn("could not mark a cancelled job", "job_id", res.ID, "err", merr)
			}
		}
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
// command's whole output. gatewayOmitted is what the gateway says it cut
// (the reference gateway's outputOmittedBytes); nil when it does not say,
// and then the last cut line in out is taken for the gateway's, though the
// command may have printed it.
func capOutput(out string, limit int, gatewayOmitted *int64) (string, bool, int) {
	total := len(out)
	truncated := false
	switch {
	case gatewayOmitted != nil && *gatewayOmitted > 0:
		// Its cut line is "[... N bytes omitted ...]" with N the count:
		// whichever such line is the gateway's, it is this long.
		line := "\n[... " + strconv.FormatInt(*gatewayOmitted, 10) + " bytes omitted ...]\n"
		if strings.Contains(out, line) {
			total += int(*gatewayOmitted) - len(line)
		} else {
			total += int(*gatewayOmitted)
		}
		truncated = true
	case gatewayOmitted != nil:
		// Nothing cut: a cut line in the output is the command's own.
	default:
		if m := omittedLine.FindAllStringSubmatchIndex(out, -1); len(m) > 0 {
			last := m[len(m)-1]
			if n, err := strconv.Atoi(out[last[2]:last[3]]); err == nil {
				total += n - (last[1] - last[0])
				truncated = true
			}
		}
	}
	if limit > 0 && len(out) > limit {
		// Cut on rune boundaries: half a UTF-8 sequence would come out as
		// U+FFFD in the result's JSON.
		h, t := limit/2, len(out)-(limit-limit/2)
		for h > 0 && !utf8.RuneStart(out[h]) {
			h--
		}
		for t < len(out) && !utf8.RuneStart(out[t]) {
			t++
		}
		head, tail := out[:h], out[t:]
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
