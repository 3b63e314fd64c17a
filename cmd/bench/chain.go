package main

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/jobs"
)

// chainRound is one batch of the ordered-batch measurement.
type chainRound struct {
	perS       float64 // jobs per second, first enqueue to last result
	cmdsPerJob float64 // Redis commands processed (all of them) per job
}

// chainBatch returns steps `true` jobs in each of tasks tasks named
// prefix0, prefix1, …: in task-major order (all of task 0's steps, then
// task 1's, …), as people write batch files, or in step-major order (step
// 0 of every task, then step 1, …).
func chainBatch(prefix string, tasks, steps int, taskMajor bool) []jobs.Job {
	js := make([]jobs.Job, 0, tasks*steps)
	for i := range tasks * steps {
		task := i % tasks // step-major: the i/tasks-th step of every task in turn
		if taskMajor {
			task = i / steps // task-major: steps jobs of one task in a row
		}
		js = append(js, jobs.Job{ID: uuid.NewString(), TaskID: fmt.Sprintf("%s%d", prefix, task), Command: "true"})
	}
	return js
}

// chains runs the same tasks × steps batch of `true` in task-major and in
// step-major order, rounds times in turn, through one worker with the
// bench's concurrency against the reference gateway, and returns every
// round of each.
func (e *env) chains(ctx context.Context, tasks, steps, rounds int) (taskMajor, stepMajor []chainRound, err error) {
	client, err := e.client(e.gw)
	if err != nil {
		return nil, nil, err
	}
	r, err := e.startRig(ctx, client, e.opts.concurrency, e.opts.checkInterval)
	if err != nil {
		return nil, nil, err
	}
	defer r.stop()
	prefix := "chain-" + uuid.NewString()[:8] + "-"
	// One job per task first, so that every task's sandbox exists before
	// either order runs: both then measure the same warm tasks.
	if _, err := runBatch(ctx, r.prod, chainBatch(prefix, tasks, 1, true)); err != nil {
		return nil, nil, fmt.Errorf("warm up: %w", err)
	}
	for i := range rounds {
		for _, tm := range []bool{true, false} {
			cr, err := e.chainRound(ctx, r, chainBatch(prefix, tasks, steps, tm))
			if err != nil {
				return nil, nil, err
			}
			name := "step-major"
			if tm {
				name, taskMajor = "task-major", append(taskMajor, cr)
			} else {
				stepMajor = append(stepMajor, cr)
			}
			e.progress("chain round %d, %s: %.0f jobs/s, %.1f Redis commands per job", i+1, name, cr.perS, cr.cmdsPerJob)
		}
	}
	return taskMajor, stepMajor, nil
}

// chainRound runs js as one batch and counts what it took: wall time and
// Redis commands, from just before the first enqueue to the last result.
func (e *env) chainRound(ctx context.Context, r *rig, js []jobs.Job) (chainRound, error) {
	// Let the previous batch's tail (asynq's last acks) pass first, so
	// that it is not counted here.
	if !pause(ctx, 200*time.Millisecond) {
		return chainRound{}, ctx.Err()
	}
	c0, _, err := redisStats(ctx, r.prdb)
	if err != nil {
		return chainRound{}, err
	}
	took, err := runBatch(ctx, r.prod, js)
	if err != nil {
		return chainRound{}, err
	}
	c1, _, err := redisStats(ctx, r.prdb)
	if err != nil {
		return chainRound{}, err
	}
	n := float64(len(js))
	// The first INFO is counted in the second's total.
	return chainRound{perS: n / took.Seconds(), cmdsPerJob: float64(c1-c0-1) / n}, nil
}
