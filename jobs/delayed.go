package jobs

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/wrap"
)

// Delayed jobs (Job.RunAt; enqueue -in, -at).
//
// A delayed job must not hold back its task's later jobs while it waits
// for its time, so it does not join its task's sequence when it is
// enqueued: it goes to asynq's scheduled set, due at its run_at, where the
// dashboard lists it (Scheduled, with its time), -result says when it
// runs, and -cancel finds it. asynq's forwarder makes it pending when it
// falls due, and its first delivery joins the sequence then
// (seqJoinDueScript):
//
//	head      runs now, as any head;
//	waiting   goes back to asynq, parked in the retry set (due in 2200,
//	          parkedAt), where the hand-over promotes it as it promotes a
//	          parked job from the scheduled set (seqLib's promote takes both).
//
// A hand-over that reaches the job in the moment between its join and its
// return to the retry set finds it "active", which promote cannot move: it
// notes the task in the late-heads set, and the workers' late-head loop
// promotes the job once it is in the retry set. So the job is promoted
// once, whichever set it sits in. The repair also promotes a head parked in
// the retry set.
//
// Cancelled before it falls due (Producer.Cancel), the job is brought
// forward, and its delivery, finding the cancel mark, joins nothing and
// ends "cancelled" without running. A terminate of the task does not
// cancel delayed jobs that have not fallen due: they were not in the
// sequence yet.

// seqJoinDueScript joins a delayed job, delivered for the first time, to
// the end of its task's sequence: {1} it is the head (or has a result: the
// delivery's checks end it), {2} it waits.
//
// KEYS: seqLib's, 4 the job's task hash. ARGV: seqLib's, 6 job id.
var seqJoinDueScript = redis.NewScript(seqLib + `
if redis.call('HEXISTS', KEYS[4], 'result') == 1 then return 1 end
local head = redis.call('HGET', SEQ, 'head')
if head == ARGV[6] then return 1 end
if redis.call('LPOS', SEQW, ARGV[6]) then return 2 end
if not head then
	redis.call('HSET', SEQ, 'head', ARGV[6], 'since', NOWMS)
	redis.call('ZADD', HEADS, NOWMS, TASK)
	return 1
end
redis.call('RPUSH', SEQW, ARGV[6])
return 2
`)

// enqueueDelayed enqueues j to run at *j.RunAt, outside its task's
// sequence until then.
func (p *Producer) enqueueDelayed(ctx context.Context, j Job, e Enqueued, notify string) (Enqueued, error) {
	task, err := NewExecTask(ExecPayload{Job: j, Nonce: wrap.NewNonce(), Notify: notify,
		QueuedAtMs: time.Now().UnixMilli(), Seq: true, JoinOnRun: true})
	if err != nil {
		return Enqueued{}, err
	}
	// Scheduled, so no wake-up now: asynq's forwarder's comes when it is due.
	_, err = enqueueAndWake(ctx, p.client, p.rdb, p.cfg.Prefix, task, asynq.TaskID(j.ID), asynq.Queue(e.Queue),
		asynq.MaxRetry(p.cfg.MaxRetry), asynq.Retention(p.cfg.Retention),
		asynq.Timeout(j.Timeout()+2*time.Minute), asynq.ProcessAt(dueSecond(*j.RunAt)))
	if errors.Is(err, asynq.ErrTaskIDConflict) {
		e.Existed = true
		return e, nil
	}
	if err != nil {
		return Enqueued{}, fmt.Errorf("jobs: enqueue %s: %w", j.ID, err)
	}
	p.knowQueue(e.Queue)
	return e, nil
}

// dueSecond is when asynq may hand over a job due at t: asynq keeps due
// times in whole seconds, and moves a job once the second has begun, up to
// a second early; the next whole second is never early.
func dueSecond(t time.Time) time.Time {
	if s := t.Truncate(time.Second); !s.Equal(t) {
		return s.Add(time.Second)
	}
	return t
}

// joinDue joins a delayed job to its task's sequence on delivery, and
// reports whether it must wait for its turn. A cancelled job joins
// nothing: its delivery ends it at once.
func (s store) joinDue(ctx context.Context, queue, jobID, taskID string) (wait bool, err error) {
	if s.cancelRequested(ctx, jobID) {
		return false, nil
	}
	q := s.sequence(queue, taskID)
	n, err := seqJoinDueScript.Run(ctx, s.rdb, q.keys(taskKey(queue, jobID)), q.args(time.Now(), jobID)...).Int64()
	if err != nil {
		return false, fmt.Errorf("jobs: join the sequence of task %q: %w", taskID, err)
	}
	return n == joinWait, nil
}

// errNotDue sends back a delayed job delivered before its run_at.
var errNotDue = errors.New("delivered before its run_at; comes back then")

// errWaitsTurn parks a delayed job that fell due behind other jobs of its
// task (retryLater with park: back in asynq until its turn).
var errWaitsTurn = errors.New("fell due behind other jobs of its task; waits for its turn")
