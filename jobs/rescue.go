package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/sandboxpool"
	"github.com/boxq/boxq/wrap"
)

// rescueNote is what a worker leaves with an exec it starts (the pool's
// in-flight mark), so that if it dies, a rescuer can finish the job as it
// would have: the exec id alone is a one-way hash of the job id.
type rescueNote struct {
	Job         string `json:"job"`
	Queue       string `json:"queue"`
	Task        string `json:"task"`
	Seq         bool   `json:"seq,omitempty"`
	Nonce       string `json:"nonce"`
	Notify      string `json:"notify,omitempty"`
	Cwd         string `json:"cwd,omitempty"` // the job's own cwd ("" : the task's tracked one)
	TimeoutMs   int64  `json:"timeout_ms"`
	QueuedAtMs  int64  `json:"queued_at_ms,omitempty"`
	StartedAtMs int64  `json:"started_at_ms"`
	Attempts    int    `json:"attempts"`
}

// Rescuer finishes the jobs of workers that died with a command running:
// every worker runs one, on a short tick. It claims a task whose lease
// lapsed with an exec in flight (once across the fleet: the pool's claim
// is a Lua script), re-attaches to the exec through the gateway, waits for
// it to end, and writes the job's result, fenced, releasing the task and
// handing its sequence over in the same round trip: exactly what the dead
// worker would have written, cwd included. When asynq delivers the job
// again later, the delivery finds the result and acks.
type Rescuer struct {
	h     *ExecHandler
	every time.Duration
	log   *slog.Logger
	// max bounds the rescues running at once in this worker.
	max int
}

// DefaultRescueEvery is how often a worker looks for orphaned execs.
const DefaultRescueEvery = time.Second

// Run ticks until ctx ends, then waits for its rescues: those cut short
// leave their tasks to another rescuer.
func (r *Rescuer) Run(ctx context.Context) error {
	t := time.NewTicker(r.every)
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, r.max)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if len(slots) == cap(slots) {
			continue
		}
		orphans, err := r.h.pool.ClaimOrphans(ctx)
		if err != nil {
			if ctx.Err() == nil {
				r.log.Warn("look for orphaned commands", "err", err)
			}
			continue
		}
		for _, o := range orphans {
			slots <- struct{}{}
			wg.Go(func() {
				defer func() { <-slots }()
				r.h.rescue(ctx, o)
			})
		}
	}
}

// rescue finishes the first noted exec of an orphaned task; the others
// (rare: holders that crashed one after the other) are claimed again on a
// later tick.
func (h *ExecHandler) rescue(ctx context.Context, o sandboxpool.Orphan) {
	l := o.Lease
	var n rescueNote
	var ex sandboxpool.OrphanExec
	for _, e := range o.Execs {
		if json.Unmarshal([]byte(e.Note), &n) == nil && n.Job != "" {
			ex = e
			break
		}
	}
	log := h.log.With("task_id", l.TaskID(), "sandbox_id", l.SandboxID(), "rescue", true)
	if ex.ExecID == "" {
		// Nothing a rescuer can finish: clear the marks' notes' owner by
		// releasing the first, and leave the rest to their jobs.
		log.Warn("orphaned exec without a readable note; clearing its mark", "exec_id", o.Execs[0].ExecID)
		l.Rescue(o.Execs[0].ExecID)
		h.release(ctx, log, l, "")
		return
	}
	l.Rescue(ex.ExecID)
	log = log.With("job_id", n.Job, "exec_id", ex.ExecID)
	if !ex.Armed || l.SandboxID() == "" {
		// Its worker died before it started the command (creating the
		// sandbox, waiting for an earlier command): nothing ran, and asynq
		// delivers the job again; clear the mark so that nothing waits on it.
		log.Info("the dead worker had not started the command; leaving the job to asynq's re-delivery")
		h.release(ctx, log, l, "")
		return
	}
	log.Info("rescuing a dead worker's command")
	h.metrics.addRescue()
	owner := strconv.FormatInt(l.Token(), 10)
	taken, err := h.store.takeOver(ctx, n.Queue, n.Job, owner)
	if err != nil {
		log.Warn("rescue: take the job over", "err", err)
		h.abandon(ctx, log, l, 0)
		return
	}
	if taken == 0 {
		// A later delivery of the job holds it: not ours to finish.
		log.Info("rescue: the job is in other hands")
		h.release(ctx, log, l, "")
		return
	}
	res := Result{ID: n.Job, TaskID: n.Task, ExecID: ex.ExecID, SandboxID: l.SandboxID(), Attempts: n.Attempts,
		StartedAt: time.UnixMilli(n.StartedAtMs).UTC(), Rescued: true}
	if n.QueuedAtMs > 0 {
		res.QueuedAt = time.UnixMilli(n.QueuedAtMs).UTC()
	}
	d := &delivery{queue: n.Queue, jobID: n.Job, notify: n.Notify, owner: owner, res: &res}
	if n.Seq {
		d.seqTask = n.Task
	}

	timeout := time.Duration(n.TimeoutMs) * time.Millisecond
	deadline := time.UnixMilli(n.StartedAtMs).Add(timeout + rescueGrace)
	st, cancelled, err := h.collect(ctx, l, n.Job, ex.ExecID, deadline)
	switch {
	case errors.Is(err, errRescueStopped):
		// The worker stops, or another holder took the task: leave it.
		if !leaseLost(l) {
			h.abandon(ctx, log, l, 0)
		}
		return
	case taken == 2 && (err == nil || errors.Is(err, gateway.ErrExecNotFound) || errors.Is(err, gateway.ErrSandboxGone)):
		// The job has its result (its worker wrote it, then lost the race
		// for the lease, or died before it saw its command end): now that
		// the command has ended, clear the mark, without a second result,
		// keeping the cwd the command reported.
		log.Info("rescue: the job had its result already")
		cwd := ""
		if err == nil {
			cwd = wrap.ParseAll(st.Output, wrap.Marker(n.Nonce)).Cwd
		}
		h.release(ctx, log, l, cwd)
		return
	case taken == 2:
		h.abandon(ctx, log, l, rescueDelay)
		return
	case errors.Is(err, gateway.ErrExecNotFound) || errors.Is(err, gateway.ErrSandboxGone):
		log.Warn("rescue: the gateway does not know the command", "err", err)
		res.Status, res.ReturnCode = StatusError, 1
		res.Error = "the worker running this command died, and the gateway no longer knows the command (it restarted, or the sandbox ended); its outcome is unknown, and it is not run again so that it cannot run twice"
		if err := h.releaseAndFinish(ctx, log, l, "", d); err != nil {
			log.Warn("rescue: write result", "err", err)
		}
		return
	case err != nil:
		log.Warn("rescue: collect the command; leaving it for another try", "err", err)
		h.abandon(ctx, log, l, rescueDelay)
		return
	}
	newCwd := h.fillResult(&res, st, wrap.Marker(n.Nonce), n.Cwd, l.Cwd(), l.Spec().Cwd, timeout)
	if res.Status == StatusCancelled && !cancelled {
		// Nobody cancelled it: the gateway stopped it (see ProcessTask).
		res.Status, res.ReturnCode, res.Error = StatusError, 1, errGatewayStopped
	} else if res.Status == StatusCancelled {
		res.Error = h.store.cancelReason(ctx, n.Job)
	}
	log.Info("rescued a dead worker's command", "status", res.Status, "returncode", res.ReturnCode)
	if err := h.releaseAndFinish(ctx, log, l, newCwd, d); err != nil {
		log.Warn("rescue: write result", "err", err)
	}
}

// rescueGrace is how long past a command's own timeout (and the client's
// grace) a rescuer waits for it before cancelling it.
const rescueGrace = 10*time.Second + time.Minute

// errRescueStopped means a rescue was cut short: the worker is stopping,
// or the rescuer's lease went to another holder.
var errRescueStopped = errors.New("jobs: rescue stopped")

// collect waits for an exec to end, long-polling the gateway; past the
// deadline it cancels the exec and reports it timed out.
func (h *ExecHandler) collect(ctx context.Context, l *sandboxpool.Lease, jobID, execID string, deadline time.Time) (st gateway.ExecState, cancelled bool, err error) {
	for {
		if h.cancels.requested(jobID, 0) || h.store.cancelRequested(ctx, jobID) {
			// Cancelled (enqueue -cancel, the dashboard, a terminate) while
			// its worker was dead: cancel the command, as its worker would.
			return h.stopAs(ctx, l, execID, gateway.StatusCancelled, gateway.ReturnCodeCancelled), true, nil
		}
		select {
		case <-ctx.Done():
			return gateway.ExecState{}, false, errRescueStopped
		case <-l.Lost():
			return gateway.ExecState{}, false, errRescueStopped
		default:
		}
		if time.Now().After(deadline) {
			return h.stopAs(ctx, l, execID, gateway.StatusTimeout, gateway.ReturnCodeTimeout), false, nil
		}
		// Short long-polls, so that a cancel is heard within seconds.
		wait := min(2*time.Second, time.Until(deadline))
		st, err := h.gw.PollExec(ctx, l.SandboxID(), execID, max(wait, 0))
		switch {
		case err == nil && gateway.Terminal(st.Status):
			return st, false, nil
		case err == nil:
		case errors.Is(err, gateway.ErrExecNotFound):
			return gateway.ExecState{}, false, err
		case gateway.StatusCode(err) == 404:
			return gateway.ExecState{}, false, fmt.Errorf("%w: %w", gateway.ErrSandboxGone, err)
		case gateway.Classify(err) == gateway.Permanent:
			return gateway.ExecState{}, false, err
		default:
			if !sleepCtx(ctx, 200*time.Millisecond) {
				return gateway.ExecState{}, false, errRescueStopped
			}
		}
	}
}

// stopAs stops an exec the rescuer gives up on (cancelled, or past its
// deadline) and reports it with status and rc, unless it ended on its own
// first: then its own ending is the truth.
func (h *ExecHandler) stopAs(ctx context.Context, l *sandboxpool.Lease, execID, status string, rc int) gateway.ExecState {
	st, ended := h.stopExec(ctx, h.log, l.SandboxID(), execID, 10*time.Second)
	if ended && (st.Status == gateway.StatusCompleted || st.Status == gateway.StatusFailed) {
		return st
	}
	st.Status, st.ReturnCode = status, &rc
	return st
}
