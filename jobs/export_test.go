package jobs

import (
	"context"
	"encoding/json"
	"time"
)

// SetProducerFaults installs fault points in p's Enqueue, for tests of a
// producer that dies between its steps: afterJoin runs once the job has its
// place in its task's sequence, beforeConfirm once a parked job is enqueued.
func SetProducerFaults(p *Producer, afterJoin, beforeConfirm func()) {
	p.faults = producerFaults{afterJoin: afterJoin, beforeConfirm: beforeConfirm}
}

// RescueNoteFor is the note a worker leaves with job jobID's exec (queue
// and task as given), for tests that play a worker dying at a chosen step.
func RescueNoteFor(queue, jobID, taskID string) string {
	b, _ := json.Marshal(rescueNote{Job: jobID, Queue: queue, Task: taskID, Seq: true, Nonce: "0123456789abcdef",
		TimeoutMs: 60_000, StartedAtMs: time.Now().UnixMilli(), Attempts: 1})
	return string(b)
}

// TaskKey is the key of job id's asynq task hash.
func TaskKey(queue, id string) string { return taskKey(queue, id) }

// FireSchedule runs one tick of d as s's worker would.
func FireSchedule(ctx context.Context, s *Scheduler, d Schedule, tick time.Time) {
	s.fire(ctx, d, tick)
}

// SetAfterJoinDue installs a fault point in the worker cfg makes: f runs
// when a delayed job has joined its task's sequence to wait, before asynq
// puts it back (the job is still active).
func SetAfterJoinDue(cfg *WorkerConfig, f func(jobID string)) { cfg.afterJoinDue = f }

// SetHubAfterLookup installs a fault point in h's watches: f runs after a
// watch has read the jobs it was told had ended, before it sends those
// that had not back to waiting.
func SetHubAfterLookup(h *Hub, f func()) { h.afterLookup = f }

// IdleWaits is how many times w's idle worker began to wait for a wake-up
// (wake.go); -1 when it polls instead.
func IdleWaits(w *Worker) int64 {
	if w.waker == nil {
		return -1
	}
	return w.waker.waits.Load()
}

// WakeChannel is the pub/sub channel of queue's wake-ups.
func WakeChannel(prefix, queue string) string { return wakeChannel(prefix, queue) }

// WokenRounds is how many rounds wake-ups let through in w (wake.go).
func WokenRounds(w *Worker) int64 { return w.waker.woke.Load() }
