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
	AcquireFor(ctx context.Context, taskID string, spec sandboxpool.Spec, in sandboxpool.Intent) (*sandboxpool.Lease, error)
	Release(ctx context.Context, l *sandboxpool.Lease, cwd string) error
	ReleaseWith(ctx context.Context, l *sandboxpool.Lease, cwd string, also func(redis.Pipeliner)) error
	Abandon(ctx context.Context, l *sandboxpool.Lease, rescueIn time.Duration) error
	Yield(ctx context.Context, l *sandboxpool.Lease) error
	Recreate(ctx context.Context, l *sandboxpool.Lease) error
	Rotate(ctx context.Context, l *sandboxpool.Lease) error
	Arm(ctx context.Context, l *sandboxpool.Lease) error
	Terminate(ctx context.Context, taskID string) error
	TerminateIdle(ctx context.Context, taskID string, unless []sandboxpool.Check) error
	ReapIdle(ctx context.Context, now time.Time, ttl time.Duration) (int, error)
	ClaimOrphans(ctx context.Context) ([]sandboxpool.Orphan, error)
	Get(ctx context.Context, taskID string) (sandboxpool.Record, bool, error)
}

// Gateway is what the handlers need of gateway.Client.
type Gateway interface {
	Run(ctx context.Context, sandboxID string, req gateway.StartRequest) (gateway.ExecState, error)
	PollExec(ctx context.Context, sandboxID, execID string, wait time.Duration) (gateway.ExecState, error)
	CancelExec(ctx context.Context, sandboxID, execID string) error
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
	// lifetime is the timeoutMs asked of the gateway for new sandboxes
	// (0: its default, 1 h).
	lifetime time.Duration
}

// ProcessTask implements asynq.Handler.
//
// A command's exit code, timeout (124) or cancellation (130) is a result,
// not an error. A job that ends with status "error" (bad input, a
// permanent gateway answer, its last retry) has its result written and is
// done to asynq, like any other (finalErr). Errors returned here are one
// of: a capacity wait
// (*retryLater: not counted as a failure), or an infrastructure fault
// (retried; on the last attempt the result "error" is written first).
//
// The lifecycle of a delivery, its lease, its exec and its result, and how
// a rescuer takes over from a dead worker, is drawn in docs/LIFECYCLE.md.
func (h *ExecHandler) ProcessTask(ctx context.Context, t *asynq.Task) error {
	err := h.process(ctx, t)
	if err != nil && !errors.Is(err, asynq.SkipRetry) {
		// The job comes back: say why where producers can see it
		// (Producer.Status, enqueue -wait's progress).
		h.store.noteWait(ctx, t, err)
	}
	var f *finalErr
	if errors.As(err, &f) && f.retained {
		// The job ended with status "error", and its result is written:
		// to asynq it is done, so that the result lasts the job's retention
		// like any other, rather than sit in the archive, which asynq trims
		// to its newest 10,000 tasks per queue (a batch with more failures
		// would lose results, and their ids would be free again).
		h.log.Info("job ended with status error", "job_id", f.jobID, "err", f.cause)
		return nil
	}
	return err
}

// finalErr is a job's end with status "error", its result written.
// retained says the job has a retention of its own (Producer.Enqueue sets
// one): a job from another producer may have none, and asynq deletes a
// completed task at once then, result and all; it is archived instead.
type finalErr struct {
	jobID    string
	cause    error
	retained bool
}

func (e *finalErr) Error() string { return e.cause.Error() }
func (e *finalErr) Unwrap() []error {
	return []error{e.cause, asynq.SkipRetry}
}

func (h *ExecHandler) process(ctx context.Context, t *asynq.Task) error {
	h.metrics.addInFlight(1)
	defer h.metrics.addInFlight(-1)
	startedAt := h.now()
	jobID, _ := asynq.GetTaskID(ctx)
	queue, _ := asynq.GetQueueName(ctx)
	retried, _ := asynq.GetRetryCount(ctx)
	maxRetry, _ := asynq.GetMaxRetry(ctx)

	var p ExecPayload
	res := Result{ID: jobID, ExecID: ExecID(jobID), Attempts: retried + 1, StartedAt: startedAt}
	d := &delivery{queue: queue, jobID: jobID, res: &res}
	if err := json.Unmarshal(t.Payload(), &p); err != nil {
		return h.finalError(ctx, d, fmt.Errorf("invalid job: %w", describeJSONError(err)))
	}
	d.notify = p.Notify
	d.retained = p.Nonce != "" // set by Producer.Enqueue, like the retention
	if p.Seq {
		d.seqTask = p.TaskID
	}
	res.TaskID = p.TaskID
	if !utf8.Valid(t.Payload()) {
		// Decoding turned the bad bytes into U+FFFD: not the job written.
		return h.finalError(ctx, d, errors.New("invalid job: the payload is not valid UTF-8"))
	}
	if p.QueuedAtMs > 0 {
		res.QueuedAt = time.UnixMilli(p.QueuedAtMs).UTC()
	}
	log := h.log.With("job_id", jobID, "task_id", p.TaskID)
	if err := p.Validate(); err != nil {
		log.Info("rejected job", "err", err)
		return h.finalError(ctx, d, err)
	}

	if p.JoinOnRun {
		// A delayed job, due now: it joins its task's sequence (delayed.go).
		// One delivered early (the dashboard's "run now") goes back until
		// its time; not when cancelled: its delivery ends it at once.
		if p.RunAt != nil && h.now().Before(*p.RunAt) && !h.store.cancelRequested(ctx, jobID) {
			return &retryLater{err: errNotDue, after: dueSecond(*p.RunAt).Sub(h.now()), exact: true, wait: WaitSchedule}
		}
		wait, err := h.store.joinDue(ctx, queue, jobID, p.TaskID)
		if err != nil {
			return h.failure(ctx, d, retried, maxRetry, err)
		}
		if wait {
			log.Info("delayed job fell due behind other jobs of its task; it waits for its turn")
			return &retryLater{err: errWaitsTurn, park: true, wait: WaitTurn}
		}
	}

	// What a delivery must check first (a result already written, a cancel
	// request, another job's turn) rides along with the take of the lease,
	// and so do the exec's in-flight mark with what a rescuer needs, and
	// the job's stamp (the lease's token fences the result; the sandbox
	// the command starts in tells a later delivery whether it may start
	// it): one round trip to Redis.
	nonce := p.Nonce
	if nonce == "" {
		// Payloads written by other producers may lack it: derive one from
		// the job id, so that every delivery parses the same marker.
		sum := sha256.Sum256([]byte("boxq-marker:" + jobID))
		nonce = hex.EncodeToString(sum[:12])
	}
	note, err := json.Marshal(rescueNote{Job: jobID, Queue: queue, Task: p.TaskID, Seq: p.Seq, Nonce: nonce, Notify: p.Notify,
		Cwd: p.Cwd, TimeoutMs: capTimeout(p.Timeout(), h.lifetime).Milliseconds(), QueuedAtMs: p.QueuedAtMs, StartedAtMs: startedAt.UnixMilli(), Attempts: res.Attempts})
	if err != nil {
		return fmt.Errorf("jobs: encode rescue note: %w", err)
	}
	acquireStart := time.Now()
	lease, err := h.pool.AcquireFor(ctx, p.TaskID, h.specOf(&p.Job), sandboxpool.Intent{
		ExecID: res.ExecID, Note: string(note), Unless: h.store.deliveryChecks(queue, jobID, &p), Stamp: taskKey(queue, jobID)})
	h.metrics.observeAcquire(time.Since(acquireStart))
	var veto *sandboxpool.VetoError
	if errors.As(err, &veto) {
		return h.vetoed(ctx, log, d, veto.Index)
	}
	if err != nil {
		return h.failure(ctx, d, retried, maxRetry, fmt.Errorf("acquire sandbox: %w", err))
	}
	d.owner = strconv.FormatInt(lease.Token(), 10)
	log = log.With("sandbox_id", lease.SandboxID())
	res.SandboxID = lease.SandboxID()
	// A sandbox that replaced one a terminate or the reaper ended.
	res.SandboxRecreated = lease.Recreated()

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
			return h.failure(ctx, d, retried, maxRetry, err)
		}
	}

	// An earlier delivery of this job may have started the command (it
	// took the job this far, then died, stopped or lost its lease). In the
	// same sandbox, starting the same exec id again re-attaches to it. In
	// another one (the first was terminated, reaped, or lost with a
	// gateway restart) the command must not run again.
	startedIn := lease.StartedIn()
	if startedIn != "" && startedIn != lease.SandboxKey() {
		log.Warn("the sandbox this job's command may have started in is gone; not running it again")
		return h.finalResult(ctx, log, d, lease, errLostWhileRunning)
	}

	// A sandbox near the end of its lifetime would cut the command: rotate
	// it first (a persistent one: its files and cwd go to its successor).
	// Not when this job's command may already run in it.
	timeout := capTimeout(p.Timeout(), lifetimeOf(lease))
	if startedIn == "" && needsRotation(lease, timeout, h.now()) {
		old := lease.SandboxID()
		if err := h.pool.Rotate(ctx, lease); err != nil {
			h.release(ctx, log, lease, "")
			return h.failure(ctx, d, retried, maxRetry, fmt.Errorf("rotate the sandbox near its lifetime: %w", err))
		}
		log.Info("rotated the sandbox near the end of its lifetime", "old_sandbox_id", old, "new_sandbox_id", lease.SandboxID())
		log = log.With("sandbox_id", lease.SandboxID())
		res.SandboxID, res.SandboxRecreated = lease.SandboxID(), true
	}

	// The take armed the exec for a rescuer only if nothing had to come
	// before its start; after a create or a wait, arm it now.
	if lease.Created() || len(lease.PrevExecIDs()) > 0 || res.SandboxRecreated {
		if err := h.pool.Arm(ctx, lease); err != nil {
			h.release(ctx, log, lease, "")
			return h.failure(ctx, d, retried, maxRetry, err)
		}
	}
	if leaseLost(lease) {
		log.Warn("lease lost to another holder before the command started; leaving the job to it")
		return &retryLater{err: ErrFenced, after: 5 * time.Second}
	}

	marker := wrap.Marker(nonce)
	// No cwd known: no cd at all, so the command starts in the sandbox's
	// default cwd as the gateway sets it. (Spelling out "/root" would be the
	// same under isolation, but a gateway without isolation maps only its
	// own default to the sandbox's directory, not a path a script cds to.)
	cwd := firstNonEmpty(p.Cwd, lease.Cwd())

	runCtx, cancelRun := h.runContext(ctx, jobID, lease.Lost())
	defer cancelRun(nil)
	execStart := time.Now()
	if startedIn == "" && !res.QueuedAt.IsZero() {
		// The first delivery to get this far (the take stamps the job, so
		// a later one has startedIn set): the queue wait is observed once
		// per job, however many times it came back to wait for its turn or
		// for capacity before.
		h.metrics.observeQueueWait(execStart.Sub(res.QueuedAt))
	}
	st, err := h.gw.Run(runCtx, lease.SandboxID(), h.startRequest(&p, res.ExecID, cwd, marker, timeout))
	if errors.Is(err, gateway.ErrSandboxGone) && startedIn != "" {
		// The sandbox was there when an earlier delivery took the job; the
		// command may have run in it before it went.
		log.Warn("sandbox is gone, and an earlier delivery may have started the command in it; not running it again", "err", err)
		return h.finalResult(ctx, log, d, lease, errLostWhileRunning)
	}
	if errors.Is(err, gateway.ErrSandboxGone) {
		// The sandbox was reaped, outlived its lifetime, or the gateway
		// restarted, before this command started: create a new one and
		// run it there.
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
			st, err = h.gw.Run(runCtx, lease.SandboxID(), h.startRequest(&p, res.ExecID, cwd, marker, timeout))
		}
	}
	h.metrics.observeExec(time.Since(execStart))
	if errors.Is(err, gateway.ErrDetached) {
		if leaseLost(lease) {
			// Another holder (a rescuer) has the task: it writes the
			// result. Stop waiting; never cancel the command.
			log.Warn("lease lost to another holder while the command ran; leaving the command and its result to it")
			return &retryLater{err: ErrFenced, after: 5 * time.Second}
		}
		// The worker is shutting down and asynq has put the job back. The
		// exec goes on; the next delivery, or a rescuer, re-attaches to it.
		if stoppingNow(h.stopping) {
			log.Info("worker stopping; leaving the exec running for the next delivery")
		} else {
			log.Warn("asynq stopped waiting for the job (its lease lapsed: Redis unreachable?); leaving the exec running for the next delivery")
		}
		h.abandon(ctx, log, lease, 0)
		return err
	}
	if err != nil {
		ret := h.failure(ctx, d, retried, maxRetry, fmt.Errorf("run command: %w", err))
		switch {
		case errors.Is(ret, asynq.SkipRetry) && !errors.Is(err, gateway.ErrExecNotFound):
			// The job has its final answer, but its command may still run
			// (a permanent poll error, the last retry): stop it before the
			// task's next command can start, or leave it marked in flight.
			h.stopAndRelease(ctx, log, lease, res.ExecID)
		case errors.Is(ret, asynq.SkipRetry):
			h.release(ctx, log, lease, "")
		default:
			// The job comes back, and its start may have reached the
			// gateway (an answer lost, then a refusal): leave the exec
			// marked in flight, so the task's next command waits for it
			// and the job's next delivery re-attaches to it
			// (reliability.TestStartAnswerLostThenRefused). A rescuer
			// steps in only if the job does not come back for it.
			h.abandon(ctx, log, lease, rescueDelay)
		}
		return ret
	}

	newCwd := h.fillResult(&res, st, marker, p.Cwd, lease.Cwd(), lease.Spec().WithDefaults().Cwd, timeout)
	if res.Status == StatusCancelled && ctx.Err() == nil {
		// Nobody here cancelled it: the gateway stopped the command (the
		// sandbox's lifetime ran out, or the gateway ended it). That is not
		// the user's cancel.
		res.Status, res.ReturnCode, res.Error = StatusError, 1, errGatewayStopped
	} else if res.Status == StatusCancelled {
		res.Error = h.store.cancelReason(ctx, jobID)
	}
	log.Debug("exec finished", "status", res.Status, "returncode", res.ReturnCode, "exec_id", res.ExecID)
	return h.releaseAndFinish(ctx, log, lease, newCwd, d)
}

// errGatewayStopped is the "error" of a command that the gateway stopped on
// its own (status cancelled, nobody having cancelled it).
const errGatewayStopped = "the gateway stopped the command before it ended (the sandbox reached its lifetime, or was ended by the gateway); it was not cancelled by a user"

// rotationMargin is what a command needs of its sandbox's lifetime besides
// its timeout: the start, and the gateway's kill of a timed-out command.
const rotationMargin = 5 * time.Second

// capTimeout caps a command's timeout so that it fits in a whole sandbox
// lifetime (the default 1 h lifetime cannot hold a 3,600 s timeout and the
// start): a longer one could only be cut. A lifetime of 0 is the gateway's
// default.
func capTimeout(timeout, lifetime time.Duration) time.Duration {
	if lifetime <= 0 {
		lifetime = time.Duration(gateway.DefaultTimeoutMs) * time.Millisecond
	}
	if lifetime > rotationMargin && timeout > lifetime-rotationMargin {
		return lifetime - rotationMargin
	}
	return timeout
}

// lifetimeOf is the lifetime the lease's sandbox was created with.
func lifetimeOf(l *sandboxpool.Lease) time.Duration {
	return time.Duration(l.Spec().TimeoutMs) * time.Millisecond
}

// needsRotation reports whether a command with this timeout might not fit
// in what is left of the sandbox's lifetime, but would in a new sandbox's.
// Only persistent sandboxes rotate: a non-persistent one would lose its
// files (ask for a longer lifetime instead: worker -sandbox-lifetime).
func needsRotation(l *sandboxpool.Lease, timeout time.Duration, now time.Time) bool {
	spec, lifetime := l.Spec(), lifetimeOf(l)
	if !spec.Persistent || lifetime <= 0 || l.Created() || l.CreatedAt().IsZero() || l.SandboxID() == "" {
		return false
	}
	need := timeout + rotationMargin
	return need <= lifetime && now.Sub(l.CreatedAt())+need > lifetime
}

// delivery is one delivery of a job, as far as writing its result goes.
type delivery struct {
	queue, jobID, notify string
	seqTask              string // its task, when it is part of the task's sequence
	retained             bool   // enqueued by Producer.Enqueue, with a retention
	owner                string // the lease token that fences its result ("" none yet)
	res                  *Result
}

func (d *delivery) write(data []byte) resultWrite {
	return resultWrite{queue: d.queue, jobID: d.jobID, notify: d.notify, seqTask: d.seqTask, owner: d.owner, data: data}
}

// rescueDelay is how long a rescuer leaves an exec alone whose job comes
// back by itself (a retry after a failed attempt): asynq's first retry
// comes after about a second.
const rescueDelay = time.Minute

// errLostWhileRunning is the result of a job whose command may have run in
// a sandbox that is gone.
var errLostWhileRunning = errors.New("the sandbox was lost while the command ran (it was terminated, reaped, or the gateway restarted); the command is not run again, so that it cannot run twice")

// leaseLost reports whether another holder took l.
func leaseLost(l *sandboxpool.Lease) bool {
	select {
	case <-l.Lost():
		return true
	default:
		return false
	}
}

// fillResult fills res from a finished exec and returns the cwd the
// command reported ("" none). own is the job's own cwd, tracked the task's.
// A command that exits the shell, times out, is killed, or whose own cwd
// does not exist (rc 126) reports no cwd: the task's tracked cwd stays as
// it was, and the result says that one (where the next command starts),
// never the job's own cwd, which may not exist.
func (h *ExecHandler) fillResult(res *Result, st gateway.ExecState, marker, own, tracked, defaultCwd string, timeout time.Duration) string {
	cwd := firstNonEmpty(own, tracked)
	parsed := wrap.ParseAll(st.Output, marker)
	clean, newCwd := parsed.Output, parsed.Cwd
	res.Status, res.ReturnCode = resultStatus(st)
	res.Output, res.Truncated, res.OutputBytes = capOutput(clean, h.maxOutput, st.OutputOmitted)
	res.OutputInvalidUTF8 = strings.ContainsRune(clean, utf8.RuneError) || !utf8.ValidString(clean)
	if parsed.CwdReset {
		res.CwdReset = true
		res.Error = fmt.Sprintf("the task's working directory %s no longer exists; the command ran from the sandbox's default directory", cwd)
		tracked = ""
	}
	res.Cwd = firstNonEmpty(newCwd, tracked, defaultCwd)
	if st.Status == gateway.StatusTimeout {
		res.Error = strings.TrimPrefix(res.Error+"; ", "; ") + fmt.Sprintf("command timed out after %s", timeout)
	}
	return newCwd
}

// vetoed ends a delivery that found, before it took the sandbox, that the
// job has a result already, was cancelled, or waits for its turn.
func (h *ExecHandler) vetoed(ctx context.Context, log *slog.Logger, d *delivery, check int) error {
	switch check {
	case vetoResult:
		// An earlier delivery, or a rescuer, finished this job; asynq just
		// did not hear of it (a crash between the result write and the
		// ack). The result was published when it was written; a producer
		// that missed it finds it by its sweep.
		log.Info("result already recorded; not running the command again")
		return nil
	case vetoCancel:
		d.res.Status, d.res.ReturnCode, d.res.Error = StatusCancelled, gateway.ReturnCodeCancelled, "cancelled before it ran"
		if why := h.store.cancelReason(ctx, d.jobID); why != "" {
			d.res.Error = why + " before the command ran"
		}
		return h.finish(ctx, d)
	case vetoTurn:
		// Run out of turn (the dashboard's "run now" on a parked job):
		// back to waiting; the hand-over promotes it from the retry set
		// when its turn comes.
		log.Info("not this job's turn in its task's sequence; it waits")
		h.metrics.observeWait(waitReasonTurn)
		return &retryLater{err: errors.New("another job of the task has the turn"), after: turnRetry, wait: WaitTurn}
	}
	return fmt.Errorf("jobs: delivery of %s was held back by check %d", d.jobID, check)
}

// turnRetry is when a job run out of turn is looked at again, if its turn
// has not come by then.
const turnRetry = 5 * time.Second

// runContext returns the context the gateway loop runs under. When the
// job's context ends, it ends too: with cause context.Canceled, which
// cancels the exec, when the job was cancelled or ran past asynq's
// deadline; with cause ErrDetached, which leaves the exec running for the
// job's next delivery to re-attach to, when the worker is shutting down or
// asynq lost the job's lease (Redis unreachable for longer than its 30 s:
// it will deliver the job again, a reason to wait, not to kill the command;
// reliability.TestRedisOutageLongerThanLease), or when the pool's lease
// is lost to another holder (a rescuer: it collects the exec).
//
// A job was cancelled when Producer.Cancel flagged it (before it cancelled
// the context), or when asynq's CancelProcessing, which is what the
// dashboard's Cancel button calls, asked for it (cancelWatch;
// TestCancelFromDashboard). Otherwise the exec is left running: a wrong
// detach costs a re-attach, a wrong cancel a command.
func (h *ExecHandler) runContext(ctx context.Context, jobID string, lost <-chan struct{}) (context.Context, context.CancelCauseFunc) {
	runCtx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	go func() {
		// The lease lost to another holder: stop waiting, leave the exec.
		select {
		case <-lost:
			cancel(gateway.ErrDetached)
		case <-runCtx.Done():
		}
	}()
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

// wrapCommand wraps a command to run in cwd: the job's own cwd (jobCwd,
// which must exist: rc 126 otherwise), or the task's tracked one, which
// falls back to the sandbox's default when it is gone (a later command
// deleted it), saying so in the marker.
func wrapCommand(command, jobCwd, cwd, marker string) string {
	if jobCwd != "" {
		return wrap.Command(command, jobCwd, marker)
	}
	return wrap.CommandTracked(command, cwd, marker)
}

func (h *ExecHandler) startRequest(p *ExecPayload, execID, cwd, marker string, timeout time.Duration) gateway.StartRequest {
	return gateway.StartRequest{
		ExecID:    execID,
		Command:   wrapCommand(p.Command, p.Cwd, cwd, marker),
		TimeoutMs: timeout.Milliseconds(),
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

func (h *ExecHandler) abandon(ctx context.Context, log *slog.Logger, l *sandboxpool.Lease, rescueIn time.Duration) {
	if err := h.pool.Abandon(ctx, l, rescueIn); err != nil {
		log.Warn("abandon sandbox lease failed", "err", err)
	}
}

// stopAndRelease cancels an exec that may still run and waits a little for
// it to end, then frees the lease; an exec that cannot be seen to end stays
// marked in flight, so that the task's next command waits for it and a
// rescuer clears the mark once it has ended.
func (h *ExecHandler) stopAndRelease(ctx context.Context, log *slog.Logger, l *sandboxpool.Lease, execID string) {
	if _, ended := h.stopExec(ctx, log, l.SandboxID(), execID, stopExecWait); ended {
		h.release(ctx, log, l, "")
		return
	}
	log.Warn("could not see the command end; leaving it marked in flight", "exec_id", execID)
	h.abandon(ctx, log, l, 0)
}

// stopExec cancels an exec and polls it, for at most wait, until it has
// ended; it returns its last state and whether it was seen to end (or the
// gateway no longer knows it). It runs even when ctx is cancelled.
func (h *ExecHandler) stopExec(ctx context.Context, log *slog.Logger, sandboxID, execID string, wait time.Duration) (gateway.ExecState, bool) {
	bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), wait)
	defer cancel()
	if err := h.gw.CancelExec(bg, sandboxID, execID); err != nil && !errors.Is(err, gateway.ErrExecNotFound) {
		log.Warn("cancel exec failed", "exec_id", execID, "err", err)
	}
	for bg.Err() == nil {
		st, err := h.gw.PollExec(bg, sandboxID, execID, 2*time.Second)
		switch {
		case err == nil && gateway.Terminal(st.Status):
			return st, true
		case errors.Is(err, gateway.ErrExecNotFound):
			return gateway.ExecState{}, true
		case err != nil && !sleepCtx(bg, 200*time.Millisecond):
			return gateway.ExecState{}, false
		}
	}
	return gateway.ExecState{}, false
}

// stopExecWait bounds how long a job that ends for good waits for its
// cancelled command to stop.
const stopExecWait = 15 * time.Second

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// finish writes the result (and publishes it) and records its metrics.
func (h *ExecHandler) finish(ctx context.Context, d *delivery) error {
	data, err := h.encode(d.res)
	if err != nil {
		return err
	}
	if err := h.store.writeResult(ctx, d.write(data)); err != nil {
		return err
	}
	h.metrics.observeResult(d.res)
	return nil
}

// releaseAndFinish releases the lease with the new cwd and then writes the
// result, in one round trip to Redis: the release goes first, so that the
// task's next job, which the result write hands the turn to, finds the
// task's sandbox free. The result write is fenced by the lease's token: a
// holder whose job was taken over writes nothing (ErrFenced), and the job
// comes back to find the other holder's result.
func (h *ExecHandler) releaseAndFinish(ctx context.Context, log *slog.Logger, l *sandboxpool.Lease, cwd string, d *delivery) error {
	data, err := h.encode(d.res)
	if err != nil {
		h.release(ctx, log, l, cwd)
		return err
	}
	var write *redis.Cmd
	if err := h.pool.ReleaseWith(ctx, l, cwd, func(pipe redis.Pipeliner) {
		write = h.store.queueResult(ctx, pipe, d.write(data))
	}); err != nil {
		log.Warn("release sandbox lease failed", "err", err)
	}
	n, err := write.Int64()
	if redis.HasErrorPrefix(err, "NOSCRIPT") {
		// Redis did not know the script: send it whole (the release
		// has happened; the write is what remains).
		err = h.store.writeResult(ctx, d.write(data))
		n = resultWritten
	}
	if err := resultErr(d.jobID, n, err); err != nil {
		if errors.Is(err, ErrFenced) {
			log.Warn("another holder took the job over; its result stands, not ours")
			return &retryLater{err: err, after: 5 * time.Second}
		}
		return err
	}
	h.metrics.observeResult(d.res)
	return nil
}

// finalResult ends a job that holds the lease with status "error" and no
// retries: it releases the lease (the command never started here) and
// writes the result, fenced.
func (h *ExecHandler) finalResult(ctx context.Context, log *slog.Logger, d *delivery, l *sandboxpool.Lease, cause error) error {
	d.res.Status, d.res.ReturnCode, d.res.Error = StatusError, 1, cause.Error()
	if err := h.releaseAndFinish(ctx, log, l, "", d); err != nil {
		return err
	}
	return &finalErr{jobID: d.jobID, cause: cause, retained: d.retained}
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
func (h *ExecHandler) finalError(ctx context.Context, d *delivery, cause error) error {
	d.res.Status, d.res.ReturnCode, d.res.Error = StatusError, 1, cause.Error()
	if err := h.finish(ctx, d); err != nil {
		if errors.Is(err, ErrFenced) {
			return &retryLater{err: err, after: 5 * time.Second}
		}
		return err // not recorded: let asynq retry, so the answer is not lost
	}
	return &finalErr{jobID: d.jobID, cause: cause, retained: d.retained}
}

// failure decides, in one place, what a failed attempt becomes.
func (h *ExecHandler) failure(ctx context.Context, d *delivery, retried, maxRetry int, err error) error {
	h.metrics.observeGatewayError(err)
	switch {
	case errors.Is(err, sandboxpool.ErrFull):
		h.metrics.observeWait(waitReasonPoolFull)
		return &retryLater{err: err, after: 200 * time.Millisecond, wait: WaitCapacity}
	case errors.Is(err, sandboxpool.ErrBusy):
		h.metrics.observeWait(waitReasonTurn)
		return &retryLater{err: err, after: 200 * time.Millisecond, wait: WaitTurn}
	case gateway.Classify(err) == gateway.Capacity && gateway.StatusCode(err) != 0:
		h.metrics.observeWait(waitReasonGatewayCapacity)
		return &retryLater{err: err, after: max(gateway.RetryAfter(err), 500*time.Millisecond), wait: WaitCapacity}
	case errors.Is(err, gateway.ErrExecNotFound):
		// The gateway forgot the exec (restart, the sandbox ended, or a
		// re-delivery later than its retention). Running it again could
		// run the command twice. (Before the permanent case: a 404 is one.)
		return h.finalError(ctx, d, fmt.Errorf("%w (the gateway lost track of the command: it restarted, or the sandbox ended; its outcome is unknown, and it is not run again so that it cannot run twice)", err))
	case gateway.StatusCode(err) != 0 && gateway.Classify(err) == gateway.Permanent:
		return h.finalError(ctx, d, err)
	case ctx.Err() != nil && retried >= maxRetry && !stoppingNow(h.stopping):
		// The last attempt ran out of time (asynq's deadline) or was
		// cancelled: the job will not come back, so it ends here, with a
		// result that lasts (issue 12, item 7).
		if h.cancels.requested(d.jobID, cancelHeardWait) || h.store.cancelRequested(ctx, d.jobID) {
			d.res.Status, d.res.ReturnCode, d.res.Error = StatusCancelled, gateway.ReturnCodeCancelled, "cancelled"
			if ferr := h.finish(ctx, d); ferr != nil {
				return ferr
			}
			return &finalErr{jobID: d.jobID, cause: ctx.Err(), retained: d.retained}
		}
		return h.finalError(ctx, d, fmt.Errorf("giving up after %d attempts: %w", retried+1, err))
	case ctx.Err() != nil:
		// Stopped while waiting (for the task's lease, or an exec left
		// running): by a cancel from an asynq client (the dashboard), mark
		// the job as Producer.Cancel does, so that its next delivery ends
		// it cancelled rather than running it.
		if !stoppingNow(h.stopping) && !errors.Is(ctx.Err(), context.DeadlineExceeded) && h.cancels.requested(d.jobID, cancelHeardWait) {
			if merr := h.store.markCancelled(context.WithoutCancel(ctx), d.jobID, cancelMarkTTL); merr != nil {
				h.log.Warn("could not mark a cancelled job", "job_id", d.jobID, "err", merr)
			}
		}
		return ctx.Err()
	case retried >= maxRetry:
		return h.finalError(ctx, d, fmt.Errorf("giving up after %d attempts: %w", retried+1, err))
	}
	return err
}

// retryLater is a wait, not a failure: the job comes back after `after`
// and the attempt does not count against its retries. wait says what it
// waits for (WaitTurn, WaitCapacity; "" for a fenced delivery, which
// waits for the other delivery of the same job).
type retryLater struct {
	err   error
	after time.Duration
	wait  string
	// park: the job waits for its turn in its task's sequence; it goes
	// back due at parkedAt, and the hand-over promotes it.
	park bool
	// exact: come back after `after`, no jitter.
	exact bool
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
		TimeoutMs:     h.lifetime.Milliseconds(),
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
