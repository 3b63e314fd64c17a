package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/wrap"
)

// ProducerConfig configures a Producer.
type ProducerConfig struct {
	// Retention is how long results are kept after a job ends. Default 24h.
	Retention time.Duration
	// MaxRetry is how many times a job is retried after infrastructure
	// faults (capacity waits do not count). Default 8.
	MaxRetry int
	// Prefix of boxq's own Redis keys; must match the workers'. Default "boxq:".
	Prefix string
	// Sweep is how often a Waiter looks results up in Redis, besides
	// listening for them: the safety net for a missed notification.
	// Default 1s.
	Sweep  time.Duration
	Logger *slog.Logger
}

// Producer enqueues jobs and finds their results.
type Producer struct {
	rdb    redis.UniversalClient
	client *asynq.Client
	insp   *asynq.Inspector
	store  store
	cfg    ProducerConfig
	faults producerFaults

	queuesMu sync.Mutex
	queues   []string // asynq's queues, as read at queuesAt
	queuesAt time.Time
}

// NewProducer returns a Producer on rdb. Close it when done.
func NewProducer(rdb redis.UniversalClient, cfg ProducerConfig) (*Producer, error) {
	if rdb == nil {
		return nil, errors.New("jobs: producer needs a Redis client")
	}
	if cfg.Retention == 0 {
		cfg.Retention = 24 * time.Hour
	}
	if cfg.MaxRetry == 0 {
		cfg.MaxRetry = 8
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "boxq:"
	}
	if cfg.Sweep == 0 {
		cfg.Sweep = time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Retention < 0 || cfg.MaxRetry < 0 {
		return nil, errors.New("jobs: retention and max retry must not be negative")
	}
	return &Producer{
		rdb:    rdb,
		client: asynq.NewClientFromRedisClient(rdb),
		insp:   asynq.NewInspectorFromRedisClient(rdb),
		store:  store{rdb: rdb, prefix: cfg.Prefix},
		cfg:    cfg,
	}, nil
}

// Enqueued describes an enqueued job.
type Enqueued struct {
	ID    string
	Queue string
	// Existed is true when a job with this id was already enqueued: the
	// same id twice is one job.
	Existed bool
}

// Enqueue validates j and enqueues it. notify is the channel of a Waiter
// that will wait for the result ("" if nobody waits).
func (p *Producer) Enqueue(ctx context.Context, j Job, notify string) (Enqueued, error) {
	if err := j.Validate(); err != nil {
		return Enqueued{}, err
	}
	if j.ID == "" {
		j.ID = uuid.NewString()
	}
	e := Enqueued{ID: j.ID, Queue: j.QueueName()}
	// A job id names one job in every queue: its exec id and its cancel
	// mark derive from the id alone, so the same id in a second queue would
	// attach to the first one's command.
	if other, err := p.idElsewhere(ctx, j.ID, e.Queue); err != nil {
		return Enqueued{}, err
	} else if other != "" {
		return Enqueued{}, fmt.Errorf("invalid job: id %q is already a job of queue %q; job ids must be unique across queues", j.ID, other)
	}
	if j.RunAt != nil && j.RunAt.After(time.Now()) {
		// It joins its sequence when it falls due (delayed.go).
		return p.enqueueDelayed(ctx, j, e, notify)
	}
	// The task's commands run in the order they are enqueued: the job
	// joins its task's sequence first, and is enqueued runnable when it is
	// the head, parked when it waits (sequence.go).
	seq := p.store.sequence(e.Queue, j.TaskID)
	joined := time.Now()
	place, err := seq.join(ctx, p.rdb, j.ID)
	if err != nil {
		return Enqueued{}, err
	}
	if place == joinExists {
		e.Existed = true
		return e, nil
	}
	if p.faults.afterJoin != nil {
		p.faults.afterJoin()
	}
	task, err := NewExecTask(ExecPayload{Job: j, Nonce: wrap.NewNonce(), Notify: notify, QueuedAtMs: time.Now().UnixMilli(), Seq: true})
	if err != nil {
		return Enqueued{}, err
	}
	opts := []asynq.Option{asynq.TaskID(j.ID), asynq.Queue(e.Queue), asynq.MaxRetry(p.cfg.MaxRetry),
		asynq.Retention(p.cfg.Retention),
		// asynq's own deadline sits well past the client's (timeout + 10s
		// grace), so that the gateway loop, not asynq, ends a slow command.
		asynq.Timeout(j.Timeout() + 2*time.Minute)}
	if place == joinWait {
		opts = append(opts, asynq.ProcessAt(parkedAt))
	}
	// A runnable (not parked) job wakes an idle worker of its queue.
	_, err = enqueueAndWake(ctx, p.client, p.rdb, p.cfg.Prefix, task, opts...)
	if errors.Is(err, asynq.ErrTaskIDConflict) {
		// Enqueued meanwhile by another producer of the same id.
		e.Existed = true
		return e, nil
	}
	if err != nil {
		// Not enqueued, as far as we know: its place in the sequence is
		// passed over by the repair if the job never appears.
		return Enqueued{}, fmt.Errorf("jobs: enqueue %s: %w", j.ID, err)
	}
	p.knowQueue(e.Queue)
	if p.faults.beforeConfirm != nil {
		p.faults.beforeConfirm()
	}
	// A waiting job handed the turn between join and enqueue is promoted by
	// the workers' late-head loop. Only an enqueue slow enough that the
	// repair may have passed over its place (DefaultSeqRepairAfter) needs
	// a confirm: it joins again at the end if it lost its place.
	if time.Since(joined) > slowEnqueue {
		if err := seq.confirm(ctx, p.rdb, j.ID); err != nil {
			return e, err
		}
	}
	return e, nil
}

// idElsewhere returns a queue other than queue that holds a job jobID (""
// none). The queues are read once a few seconds; with one queue it costs
// nothing. Two producers sending the same id to two queues at the same
// moment are not caught (the queues' keys are in different hash slots).
func (p *Producer) idElsewhere(ctx context.Context, jobID, queue string) (string, error) {
	p.queuesMu.Lock()
	if time.Since(p.queuesAt) > queuesFresh {
		qs, err := p.insp.Queues()
		if err != nil {
			p.queuesMu.Unlock()
			return "", fmt.Errorf("jobs: list queues: %w", err)
		}
		p.queues, p.queuesAt = qs, time.Now()
	}
	var others []string
	for _, q := range p.queues {
		// The maintenance queue holds no exec job (Validate refuses it):
		// looking there would cost every enqueue a round trip.
		if q != queue && q != MaintenanceQueue {
			others = append(others, q)
		}
	}
	p.queuesMu.Unlock()
	if len(others) == 0 {
		return "", nil
	}
	pipe := p.rdb.Pipeline()
	cmds := make([]*redis.IntCmd, len(others))
	for i, q := range others {
		cmds[i] = pipe.Exists(ctx, taskKey(q, jobID))
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return "", fmt.Errorf("jobs: look %s up in other queues: %w", jobID, err)
	}
	for i, c := range cmds {
		if c.Val() == 1 {
			return others[i], nil
		}
	}
	return "", nil
}

// knowQueue adds a queue this producer enqueued to to its list.
func (p *Producer) knowQueue(queue string) {
	p.queuesMu.Lock()
	defer p.queuesMu.Unlock()
	if !slices.Contains(p.queues, queue) {
		p.queues = append(p.queues, queue)
	}
}

// queuesFresh is how long a Producer trusts its list of queues.
const queuesFresh = 2 * time.Second

// slowEnqueue is how long an enqueue may take after its job joined its
// task's sequence before it confirms its place: well under the repair's
// patience (DefaultSeqRepairAfter; a worker's SeqRepairAfter must stay
// above it).
const slowEnqueue = 5 * time.Second

// producerFaults are fault points for tests: a producer that dies between
// the steps of an enqueue (the hook panics, or blocks).
type producerFaults struct {
	afterJoin     func()
	beforeConfirm func()
}

// TerminateReason is the "error" of the results of the jobs a terminate
// cancels.
const TerminateReason = "task terminated"

// Terminate ends taskID's sandbox now, out of turn: in every queue, the
// task's waiting jobs get their "cancelled" result ("task terminated") at
// once and never run, the command running is cancelled (the same result),
// and a terminate job ends the sandbox (with a snapshot when it is
// persistent) once that command has stopped. With ifIdle it does none of
// that: the terminate job ends the sandbox only when no command of the
// task runs or waits, and its result says which. It returns the terminate
// job's id (TerminateOutcome reads its result).
func (p *Producer) Terminate(ctx context.Context, taskID string, ifIdle bool) (string, error) {
	return p.terminate(ctx, taskID, ifIdle)
}

// terminate is Terminate with asynq options for the terminate job (a
// schedule's tick gives its id).
func (p *Producer) terminate(ctx context.Context, taskID string, ifIdle bool, opts ...asynq.Option) (string, error) {
	t, err := NewTerminateTask(taskID, ifIdle)
	if err != nil {
		return "", err
	}
	if !ifIdle {
		queues, err := p.insp.Queues()
		if err != nil {
			return "", fmt.Errorf("jobs: list queues: %w", err)
		}
		for _, q := range queues {
			if err := p.stopTask(ctx, q, taskID); err != nil {
				return "", err
			}
		}
	}
	info, err := enqueueAndWake(ctx, p.client, p.rdb, p.cfg.Prefix, t, append([]asynq.Option{asynq.Queue(MaintenanceQueue), asynq.MaxRetry(p.cfg.MaxRetry), asynq.Retention(p.cfg.Retention)}, opts...)...)
	if err != nil {
		return "", fmt.Errorf("jobs: enqueue terminate of %q: %w", taskID, err)
	}
	return info.ID, nil
}

// stopTask cancels a task's jobs in one queue: the waiting ones at once,
// the head by a cancel mark and asynq's cancel message.
func (p *Producer) stopTask(ctx context.Context, queue, taskID string) error {
	now := time.Now().UTC()
	head, _, err := p.store.sequence(queue, taskID).stop(ctx, p.rdb, func(id string) ([]byte, error) {
		b, err := json.Marshal(Result{ID: id, TaskID: taskID, ExecID: ExecID(id), Status: StatusCancelled,
			ReturnCode: 130, Error: TerminateReason + " while the job waited for its turn", FinishedAt: now})
		if err != nil {
			return nil, fmt.Errorf("jobs: encode result: %w", err)
		}
		return b, nil
	})
	if err != nil || head == "" {
		return err
	}
	if err := p.store.markCancelledFor(ctx, head, TerminateReason, p.cfg.Retention); err != nil {
		return err
	}
	if err := p.insp.CancelProcessing(head); err != nil {
		return fmt.Errorf("jobs: cancel %s: %w", head, err)
	}
	return nil
}

// TerminateOutcome is what a terminate job did.
type TerminateOutcome struct {
	TaskID string `json:"task_id"`
	// Status is "terminated"; "none" when the task had no sandbox (its
	// running and waiting jobs, if any, were cancelled all the same); or
	// "busy" when an -if-idle terminate found a command of the task
	// running or waiting.
	Status string `json:"status"`
	Reason string `json:"reason,omitempty"`
}

// WaitTerminate waits for the terminate job id to end and returns what it
// did.
func (p *Producer) WaitTerminate(ctx context.Context, id string) (TerminateOutcome, error) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		info, err := p.insp.GetTaskInfo(MaintenanceQueue, id)
		if err != nil {
			return TerminateOutcome{}, fmt.Errorf("jobs: look up terminate job %s: %w", id, err)
		}
		switch {
		case len(info.Result) > 0:
			var o TerminateOutcome
			if err := json.Unmarshal(info.Result, &o); err != nil {
				return TerminateOutcome{}, fmt.Errorf("jobs: decode terminate result: %w", err)
			}
			return o, nil
		case info.State == asynq.TaskStateArchived:
			return TerminateOutcome{}, fmt.Errorf("jobs: terminate job %s failed: %s", id, info.LastErr)
		}
		select {
		case <-ctx.Done():
			return TerminateOutcome{}, ctx.Err()
		case <-t.C:
		}
	}
}

// ErrJobNotFound is returned when no queue holds the job.
var ErrJobNotFound = errors.New("job not found")

// Cancel cancels a job: a pending one never runs, a running one has its
// exec cancelled; both end with a "cancelled" result (rc 130). A job that
// waits for its turn in its task's sequence leaves it and gets its
// "cancelled" result at once. A job that already has a result is left as
// it is.
func (p *Producer) Cancel(ctx context.Context, jobID string) error {
	info, err := p.find(jobID)
	if err != nil {
		return err
	}
	if len(info.Result) > 0 {
		return nil
	}
	// The flag first: a job that starts after this line sees it, one
	// running now gets the cancel message below.
	if err := p.store.markCancelled(ctx, jobID, p.cfg.Retention); err != nil {
		return err
	}
	if pl, ok := payloadOf(info); ok && pl.Seq {
		res, err := json.Marshal(Result{ID: jobID, TaskID: pl.TaskID, ExecID: ExecID(jobID), Status: StatusCancelled,
			ReturnCode: 130, Error: "cancelled while it waited for its turn", FinishedAt: time.Now().UTC(),
			QueuedAt: time.UnixMilli(pl.QueuedAtMs).UTC()})
		if err != nil {
			return fmt.Errorf("jobs: encode result: %w", err)
		}
		switch n, err := p.store.sequence(info.Queue, pl.TaskID).leave(ctx, p.rdb, jobID, res); {
		case err != nil:
			return err
		case n == leaveHasResult:
			return nil
		case n == leaveDone, n == leaveIsHead, n == leaveNotHere:
			// Out of its sequence with its result (done), or a job that may
			// run (the head, or one in no sequence): the cancel below.
		}
	}
	if err := p.insp.CancelProcessing(jobID); err != nil {
		return fmt.Errorf("jobs: cancel %s: %w", jobID, err)
	}
	if info.State == asynq.TaskStateRetry || info.State == asynq.TaskStateScheduled {
		// Bring it forward so that a worker ends it: with its cancelled
		// result, or, for one taken out of its sequence with its result
		// written, just acked.
		if p.insp.RunTask(info.Queue, jobID) == nil {
			// Pending now, and published by no one else (wake.go).
			wake(ctx, p.rdb, p.cfg.Prefix, info.Queue)
		}
	}
	return nil
}

// payloadOf decodes an exec job's payload.
func payloadOf(info *asynq.TaskInfo) (ExecPayload, bool) {
	var pl ExecPayload
	if info.Type != TypeExec || json.Unmarshal(info.Payload, &pl) != nil {
		return pl, false
	}
	return pl, true
}

// Lookup returns a job's result. ok is false while the job has none yet;
// state then says where it is: asynq's state (pending, active, retry,
// …), or, for a job waiting for its turn in its task's sequence,
// "waiting" with the job whose turn it is and how many are ahead.
func (p *Producer) Lookup(ctx context.Context, jobID string) (res Result, state string, ok bool, err error) {
	info, err := p.find(jobID)
	if err != nil {
		return Result{}, "", false, err
	}
	if len(info.Result) == 0 {
		state := info.State.String()
		pl, isExec := payloadOf(info)
		// Not due yet: scheduled, or sent back until its time after an
		// early delivery (the dashboard's "run now").
		if isExec && pl.JoinOnRun && pl.RunAt != nil && (info.State == asynq.TaskStateScheduled ||
			info.State == asynq.TaskStateRetry && time.Now().Before(*pl.RunAt)) {
			state = "scheduled: runs at " + pl.RunAt.UTC().Format(time.RFC3339Nano)
		}
		if isExec && pl.Seq && (info.State == asynq.TaskStateScheduled || info.State == asynq.TaskStateRetry) {
			place, waiting, err := p.store.sequence(info.Queue, pl.TaskID).place(ctx, p.rdb, jobID)
			if err != nil {
				return Result{}, "", false, err
			}
			if waiting {
				state = fmt.Sprintf("waiting for its turn in task %q: behind job %s, %d ahead", pl.TaskID, place.Head, place.Ahead)
			}
		}
		return Result{}, state, false, nil
	}
	if err := json.Unmarshal(info.Result, &res); err != nil {
		return Result{}, info.State.String(), false, fmt.Errorf("jobs: decode result of %s: %w", jobID, err)
	}
	return res, info.State.String(), true, nil
}

// find looks a job up in every queue.
func (p *Producer) find(jobID string) (*asynq.TaskInfo, error) {
	queues, err := p.insp.Queues()
	if err != nil {
		return nil, fmt.Errorf("jobs: list queues: %w", err)
	}
	for _, q := range queues {
		info, err := p.insp.GetTaskInfo(q, jobID)
		if err == nil {
			return info, nil
		}
		if !errors.Is(err, asynq.ErrTaskNotFound) && !errors.Is(err, asynq.ErrQueueNotFound) {
			return nil, fmt.Errorf("jobs: look up %s: %w", jobID, err)
		}
	}
	return nil, fmt.Errorf("%w: %s", ErrJobNotFound, jobID)
}

// Waiter collects the results of jobs as they finish. Subscribe before
// enqueueing, pass Channel() to Enqueue, Add each enqueued job, then call
// Next until it has returned every job's result.
//
// Results arrive by Redis pub/sub, so a waiting producer hears of a result
// the moment it is written; a periodic sweep reads the results of jobs still
// outstanding, so a notification lost (a Redis restart, a job enqueued
// earlier by someone else) delays a result but never loses it.
type Waiter struct {
	p         *Producer
	channel   string
	pubsub    *redis.PubSub
	msgs      <-chan *redis.Message
	pending   map[string]pendingJob
	ready     []Result
	nextSweep time.Time
	// failingSince is when the sweeps began to fail (zero: they work).
	failingSince time.Time
	// counts is what the outstanding jobs waited for at the last sweep.
	counts WaitCounts
}

// maxRedisOutage is how long a Waiter goes on waiting while its sweeps
// fail: long enough to ride out a restart of Redis (which may spend a while
// loading its data), short enough that a producer pointed at a dead Redis
// says so.
const maxRedisOutage = 2 * time.Minute

type pendingJob struct {
	queue      string
	added      time.Time
	archivedAt time.Time // when a sweep first saw it archived without a result
}

// Subscribe returns a Waiter listening on a fresh channel.
func (p *Producer) Subscribe(ctx context.Context) (*Waiter, error) {
	ch := p.cfg.Prefix + "notify:" + uuid.NewString()
	ps := p.rdb.Subscribe(ctx, ch)
	// Wait for the subscription to be confirmed, or a result published
	// right after enqueueing could be missed.
	if _, err := ps.Receive(ctx); err != nil {
		ps.Close()
		return nil, fmt.Errorf("jobs: subscribe for results: %w", err)
	}
	return &Waiter{
		p: p, channel: ch, pubsub: ps,
		msgs:    ps.Channel(redis.WithChannelSize(4096)),
		pending: make(map[string]pendingJob),
	}, nil
}

// Channel is the notify channel to pass to Enqueue.
func (w *Waiter) Channel() string { return w.channel }

// Add registers a job to wait for.
func (w *Waiter) Add(e Enqueued) {
	w.pending[e.ID] = pendingJob{queue: e.Queue, added: time.Now()}
}

// Pending returns how many jobs have no result yet.
func (w *Waiter) Pending() int { return len(w.pending) + len(w.ready) }

// Next returns the next result. It returns an error only when ctx ends or
// Redis has failed for longer than maxRedisOutage (a restart is ridden out:
// the results are in Redis, and the sweep finds them once it is back);
// jobs that vanish without a result get an "error" result.
func (w *Waiter) Next(ctx context.Context) (Result, error) {
	// The sweep schedule lives in the Waiter, not in this call, so that
	// callers that wake up often (to draw progress) do not postpone it.
	if w.nextSweep.IsZero() {
		w.nextSweep = time.Now().Add(w.p.cfg.Sweep)
	}
	sweep := time.NewTimer(time.Until(w.nextSweep))
	defer sweep.Stop()
	for {
		if len(w.ready) > 0 {
			r := w.ready[0]
			w.ready = w.ready[1:]
			return r, nil
		}
		if len(w.pending) == 0 {
			return Result{}, errors.New("jobs: no job to wait for")
		}
		select {
		case <-ctx.Done():
			return Result{}, ctx.Err()
		case m := <-w.msgs:
			var r Result
			if err := json.Unmarshal([]byte(m.Payload), &r); err != nil {
				continue
			}
			if _, ok := w.pending[r.ID]; ok {
				delete(w.pending, r.ID)
				return r, nil
			}
		case <-sweep.C:
			switch err := w.sweep(ctx); {
			case err == nil:
				w.failingSince = time.Time{}
			case ctx.Err() != nil:
				return Result{}, ctx.Err()
			case w.failingSince.IsZero():
				w.failingSince = time.Now()
				w.p.cfg.Logger.Warn("cannot look results up; retrying", "err", err)
			case time.Since(w.failingSince) > maxRedisOutage:
				return Result{}, fmt.Errorf("jobs: Redis has failed for %v: %w", time.Since(w.failingSince).Round(time.Second), err)
			}
			d := w.sweepEvery()
			w.nextSweep = time.Now().Add(d)
			sweep.Reset(d)
		}
	}
}

// sweepEvery spaces the sweeps out as the batch grows: the sweep is a
// safety net for lost notifications, and reading 100,000 outstanding jobs
// every second would cost Redis more than the jobs do. It reads at most
// about 2,000 jobs per second.
func (w *Waiter) sweepEvery() time.Duration {
	return max(w.p.cfg.Sweep, time.Duration(len(w.pending)/2000)*time.Second)
}

// sweep reads the results of outstanding jobs in one pipelined round trip
// per queue.
func (w *Waiter) sweep(ctx context.Context) error {
	byQueue := map[string][]string{}
	for id, pj := range w.pending {
		byQueue[pj.queue] = append(byQueue[pj.queue], id)
	}
	var counts WaitCounts
	for queue, ids := range byQueue {
		states, err := w.p.store.lookup(ctx, queue, ids)
		if err != nil {
			return err
		}
		for i, st := range states {
			id := ids[i]
			if st.result == nil {
				counts.add(waitKindOf(st.state, st.wait, st.parked))
			}
			switch {
			case st.result != nil:
				var r Result
				if err := json.Unmarshal(st.result, &r); err != nil {
					r = Result{ID: id, Status: StatusError, ReturnCode: 1, Error: "unreadable result: " + err.Error()}
				}
				w.deliver(id, r)
			case !st.exists:
				w.deliver(id, Result{ID: id, Status: StatusError, ReturnCode: 1,
					Error: "job no longer exists and left no result (deleted, or its result expired)"})
			case st.state == "archived" && w.archivedFor(id) < archivedGrace:
				// asynq archives a job whose deadline passed without waiting
				// for its handler, which may still be writing its result.
			case st.state == "archived":
				msg := "job failed without a result"
				if info, err := w.p.insp.GetTaskInfo(queue, id); err == nil && info.LastErr != "" {
					msg += ": " + info.LastErr
				}
				w.deliver(id, Result{ID: id, Status: StatusError, ReturnCode: 1, Error: msg})
			}
		}
	}
	w.counts = counts
	return nil
}

// Counts returns what the outstanding jobs waited for at the last sweep
// (every ProducerConfig.Sweep, or slower for a large batch): the numbers
// behind a progress line such as "12 wait for capacity".
func (w *Waiter) Counts() WaitCounts { return w.counts }

// archivedGrace is how long a job may sit archived without a result before
// the Waiter gives up on it: asynq archives a job whose deadline passed at
// once, and its handler writes the result a moment later.
const archivedGrace = 5 * time.Second

// archivedFor notes that job id was seen archived without a result, and
// returns for how long it has been.
func (w *Waiter) archivedFor(id string) time.Duration {
	pj := w.pending[id]
	if pj.archivedAt.IsZero() {
		pj.archivedAt = time.Now()
		w.pending[id] = pj
	}
	return time.Since(pj.archivedAt)
}

func (w *Waiter) deliver(id string, r Result) {
	delete(w.pending, id)
	w.ready = append(w.ready, r)
}

// Close stops listening.
func (w *Waiter) Close() error { return w.pubsub.Close() }
