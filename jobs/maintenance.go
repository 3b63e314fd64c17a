package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/sandboxpool"
)

// TerminateHandler runs TypeTerminate tasks: it ends a task's sandbox now.
// Producer.Terminate has already cancelled the task's running and waiting
// commands; the lease take waits for the running one to stop. With IfIdle
// it ends the sandbox only when no command of the task runs (the lease is
// free) or waits (no sequence of the task in any queue asynq knows has a
// head), in the same atomic step as the take.
type TerminateHandler struct {
	pool  Pool
	store store
	log   *slog.Logger
}

// ProcessTask implements asynq.Handler.
func (h *TerminateHandler) ProcessTask(ctx context.Context, t *asynq.Task) error {
	var p TerminatePayload
	if err := json.Unmarshal(t.Payload(), &p); err != nil || p.TaskID == "" {
		return fmt.Errorf("invalid terminate job: task_id is required: %w", asynq.SkipRetry)
	}
	out := TerminateOutcome{TaskID: p.TaskID, Status: "terminated"}
	// Whether the task had a sandbox: a terminate of a task with none
	// says so rather than "terminated".
	if _, had, err := h.pool.Get(ctx, p.TaskID); err == nil && !had {
		out.Status, out.Reason = "none", "the task has no sandbox"
		if p.IfIdle {
			h.log.Info("terminate: no sandbox", "task_id", p.TaskID)
			return h.write(t, out)
		}
	}
	if p.IfIdle {
		// Every queue asynq knows: the terminate job runs in the
		// maintenance queue, not in the queues of the task's jobs.
		queues, err := h.store.rdb.SMembers(ctx, asynqQueuesKey).Result()
		if err != nil {
			return fmt.Errorf("terminate idle sandbox of task %q: list queues: %w", p.TaskID, err)
		}
		slices.Sort(queues)
		var unless []sandboxpool.Check
		for _, q := range queues {
			unless = append(unless, sandboxpool.Check{Key: h.store.sequence(q, p.TaskID).key(), Field: "head"})
		}
		err = h.pool.TerminateIdle(ctx, p.TaskID, unless)
		switch {
		case errors.Is(err, sandboxpool.ErrBusy):
			out.Status, out.Reason = "busy", "a command of the task is running"
		case errors.Is(err, sandboxpool.ErrVetoed):
			out.Status, out.Reason = "busy", "a command of the task is running or waiting for its turn"
		case err != nil:
			return fmt.Errorf("terminate idle sandbox of task %q: %w", p.TaskID, err)
		}
	} else if err := h.pool.Terminate(ctx, p.TaskID); err != nil {
		return fmt.Errorf("terminate sandbox of task %q: %w", p.TaskID, err)
	}
	h.log.Info("terminate", "task_id", p.TaskID, "if_idle", p.IfIdle, "status", out.Status)
	return h.write(t, out)
}

func (h *TerminateHandler) write(t *asynq.Task, out TerminateOutcome) error {
	b, err := json.Marshal(out)
	if err != nil {
		return fmt.Errorf("encode terminate outcome: %w", err)
	}
	if _, err := t.ResultWriter().Write(b); err != nil {
		return fmt.Errorf("write terminate outcome: %w", err)
	}
	return nil
}

// asynqQueuesKey is asynq's set of the queues it knows (base.AllQueues at
// the pinned version).
const asynqQueuesKey = "asynq:queues"

// ReapHandler runs TypeReap tasks: it terminates sandboxes idle for longer
// than ttl, and repairs the task sequences of the worker's queues
// (sequence.go). One runs per tick across the fleet.
type ReapHandler struct {
	pool   Pool
	store  store
	queues []string
	// repairAfter: WorkerConfig.SeqRepairAfter.
	repairAfter time.Duration
	ttl         time.Duration
	now         func() time.Time
	log         *slog.Logger
	metrics     *Metrics
}

// ProcessTask implements asynq.Handler.
func (h *ReapHandler) ProcessTask(ctx context.Context, _ *asynq.Task) error {
	// Every queue asynq knows, not only this worker's: the reap task runs
	// in the default queue, and a queue whose workers do not serve it must
	// be repaired too.
	queues := h.queues
	if known, err := h.store.rdb.SMembers(ctx, asynqQueuesKey).Result(); err == nil {
		queues = slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(queues), known...))))
	}
	for _, q := range queues {
		moved, err := h.store.repairSequences(ctx, q, h.now(), h.repairAfter)
		h.metrics.addSeqRepairs(moved)
		if moved > 0 {
			h.log.Info("repaired task sequences", "queue", q, "count", moved)
		}
		if err != nil {
			h.log.Warn("repair task sequences", "queue", q, "err", err)
		}
	}
	n, err := h.pool.ReapIdle(ctx, h.now(), h.ttl)
	h.metrics.addReaped(n)
	if n > 0 {
		h.log.Info("reaped idle sandboxes", "count", n, "idle_ttl", h.ttl)
	}
	if err != nil {
		return fmt.Errorf("reap idle sandboxes: %w", err)
	}
	return nil
}

// Reaper enqueues one reap task per tick. Every worker runs one; the task
// id is derived from the tick, so however many workers tick at once,
// asynq accepts one task per tick and the others get a conflict.
type Reaper struct {
	client *asynq.Client
	// rdb and prefix: to wake idle workers for the reap (wake.go).
	rdb    redis.UniversalClient
	prefix string
	every  time.Duration
	queue  string
	now    func() time.Time
	log    *slog.Logger
}

// Run ticks until ctx ends.
func (r *Reaper) Run(ctx context.Context) error {
	t := time.NewTicker(r.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if err := r.enqueue(ctx); err != nil {
				r.log.Warn("schedule reap failed", "err", err)
			}
		}
	}
}

func (r *Reaper) enqueue(ctx context.Context) error {
	tick := r.now().Truncate(r.every)
	id := "boxq-reap-" + strconv.FormatInt(tick.Unix(), 10)
	// Woken at once: a reap held back lets sandboxes outlive their idle TTL.
	_, err := enqueueAndWake(ctx, r.client, r.rdb, r.prefix, NewReapTask(),
		asynq.TaskID(id), asynq.Queue(r.queue), asynq.MaxRetry(0),
		// Keep the finished task (and so its id) past the tick, so a
		// worker that ticks late cannot enqueue the same tick again.
		asynq.Retention(2*r.every), asynq.Timeout(r.every+time.Minute))
	if errors.Is(err, asynq.ErrTaskIDConflict) {
		return nil
	}
	return err
}
