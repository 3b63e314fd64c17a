package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/jobs"
)

// waitingLoad is what jobs waiting behind their task's running job cost
// Redis.
type waitingLoad struct {
	idle0, idle float64 // commands/s with 0 and with the waiting jobs behind the heads
	notes       []string
}

// waitingRedisLoad starts a worker with the bench's concurrency against
// the reference gateway, and in each of tasks tasks a head job that runs
// `sleep <hold>`. Once the heads run, it counts the commands Redis
// processes over window; then it enqueues waiting jobs (`true`, spread
// evenly over the tasks, each task's in a row) behind the heads, lets them
// settle, and counts again over window. The heads run on throughout.
// Then it cancels every job and waits for their results, so that the
// heads' sleep is an upper bound, not a wait.
//
// The producer holds one Waiter for all the jobs (they are enqueued with
// its channel), but calls Next only after the windows: a Waiter's safety
// sweep reads every outstanding job, which is the producer's cost, not
// the queue's.
//
// A set-up that falls short (not every head running when the first window
// opens, or heads that ended before the second closed) is measured anyway
// and said so in notes.
func (e *env) waitingRedisLoad(ctx context.Context, tasks, waiting int, hold, window time.Duration) (out waitingLoad, err error) {
	gw, err := e.client(e.gw)
	if err != nil {
		return out, err
	}
	r, err := e.startRig(ctx, gw, e.opts.concurrency, e.opts.checkInterval)
	if err != nil {
		return out, err
	}
	defer r.stop()
	w, err := r.prod.Subscribe(ctx)
	if err != nil {
		return out, err
	}
	defer w.Close()
	prefix := "wait-" + uuid.NewString()[:8] + "-"
	var ids []string
	enqueue := func(js []jobs.Job) error {
		enq := make([]jobs.Enqueued, len(js))
		err := parallel(ctx, len(js), enqueuers, func(i int) error {
			var err error
			enq[i], err = r.prod.Enqueue(ctx, js[i], w.Channel())
			return err
		})
		for _, en := range enq {
			if en.ID != "" {
				w.Add(en)
				ids = append(ids, en.ID)
			}
		}
		return err
	}
	// However the measurement ends, cancel what was enqueued and wait for
	// the results: heads left running would hold the gateway for hold.
	defer func() {
		if err := e.cancelAll(ctx, r.prod, w, ids); err != nil {
			out.notes = append(out.notes, fmt.Sprintf("waiting: clean-up: %v", err))
		}
	}()

	heads := make([]jobs.Job, tasks)
	for i := range heads {
		heads[i] = jobs.Job{ID: uuid.NewString(), TaskID: fmt.Sprintf("%s%d", prefix, i), Command: fmt.Sprintf("sleep %g", hold.Seconds())}
	}
	if err := enqueue(heads); err != nil {
		return out, err
	}
	running := func() (int, error) {
		sbs, err := gw.List(ctx)
		n := 0
		for _, sb := range sbs {
			if strings.HasPrefix(sb.LogicalKey, prefix) {
				n += sb.RunningExecs
			}
		}
		return n, err
	}
	// Every head running: sandboxes created, execs started. Bounded, as
	// on a loaded machine that may take a while; short of it, measure with
	// the heads that run.
	begin, upTo := time.Now(), min(hold/4, 30*time.Second)
	n, err := running()
	for ; err == nil && n < tasks && time.Since(begin) < upTo; n, err = running() {
		if !pause(ctx, 20*time.Millisecond) {
			return out, ctx.Err()
		}
	}
	if err != nil {
		return out, fmt.Errorf("list sandboxes: %w", err)
	}
	if n < tasks {
		out.notes = append(out.notes, fmt.Sprintf("waiting: only %d of %d heads were running after %v; measured behind those", n, tasks, upTo))
	}
	e.progress("waiting: %d heads running after %v", n, time.Since(begin).Round(time.Millisecond))
	headsAtStart := n

	settle := min(window, time.Second)
	count := func() (float64, error) {
		// Let the last enqueues and the first deliveries pass.
		if !pause(ctx, settle) {
			return 0, ctx.Err()
		}
		c0, _, err := redisStats(ctx, r.prdb)
		if err != nil {
			return 0, err
		}
		start := time.Now()
		if !pause(ctx, window) {
			return 0, ctx.Err()
		}
		c1, _, err := redisStats(ctx, r.prdb)
		if err != nil {
			return 0, err
		}
		// The first INFO is counted in the second's total.
		return float64(c1-c0-1) / time.Since(start).Seconds(), nil
	}
	if out.idle0, err = count(); err != nil {
		return out, err
	}

	js := make([]jobs.Job, waiting)
	per := (waiting + tasks - 1) / tasks
	for i := range js {
		js[i] = jobs.Job{ID: uuid.NewString(), TaskID: fmt.Sprintf("%s%d", prefix, i/per), Command: "true"}
	}
	begin = time.Now()
	if err := enqueue(js); err != nil {
		return out, err
	}
	e.progress("waiting: %d jobs enqueued behind the heads in %v", waiting, time.Since(begin).Round(time.Millisecond))
	if out.idle, err = count(); err != nil {
		return out, err
	}
	if n, err := running(); err != nil {
		return out, fmt.Errorf("list sandboxes: %w", err)
	} else if n < headsAtStart {
		out.notes = append(out.notes, fmt.Sprintf("waiting: %d of %d heads still ran at the end of the windows (raise -waiting-hold)", n, headsAtStart))
	}
	return out, nil
}

// cancelAll cancels the jobs ids (the waiting ones first: they are the
// later ones), and waits, bounded, for the result of each.
func (e *env) cancelAll(ctx context.Context, prod *jobs.Producer, w *jobs.Waiter, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	begin := time.Now()
	err := parallel(ctx, len(ids), enqueuers, func(i int) error {
		id := ids[len(ids)-1-i]
		if err := prod.Cancel(ctx, id); err != nil && !errors.Is(err, jobs.ErrJobNotFound) {
			return fmt.Errorf("cancel %s: %w", id, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cancelled := 0
	for w.Pending() > 0 {
		res, err := w.Next(wctx)
		if err != nil {
			return fmt.Errorf("%d jobs still without a result after cancelling: %w", w.Pending(), err)
		}
		if res.Status == jobs.StatusCancelled {
			cancelled++
		}
	}
	e.progress("waiting: %d jobs cancelled (%d answered cancelled) in %v", len(ids), cancelled, time.Since(begin).Round(time.Millisecond))
	return nil
}
