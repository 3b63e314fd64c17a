package jobs

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/sandboxpool"
)

// Results live where asynq keeps them: the "result" field of the task's
// hash, so asynq's inspector, the dashboard and its retention all see them.
// boxq writes that field itself rather than through asynq.ResultWriter for
// two reasons: the write and the publish to a waiting producer go in one
// round trip, and a job whose context was cancelled (CancelProcessing) can
// still record its "cancelled" result. The key layout is asynq's
// (base.TaskKey) at the pinned version; TestResultVisibleToInspector guards it.
func taskKey(queue, id string) string {
	return "asynq:{" + queue + "}:t:" + id
}

// writeResultScript stores a result and publishes it in one round trip.
// It never creates the task hash: a result for a task that asynq has
// already deleted would otherwise linger without expiry.
var writeResultScript = redis.NewScript(`
if redis.call("EXISTS", KEYS[1]) == 1 then
	redis.call("HSET", KEYS[1], "result", ARGV[1])
end
if ARGV[2] ~= "" then
	redis.call("PUBLISH", ARGV[2], ARGV[1])
end
return 1
`)

// store holds the few Redis keys boxq keeps next to asynq's.
type store struct {
	rdb    redis.UniversalClient
	prefix string
}

func (s store) cancelKey(jobID string) string { return s.prefix + "cancel:" + jobID }

// writeResult stores the encoded result with the task and publishes it on
// notify ("" = nobody waits). It uses its own bounded context: a result
// must be written even when the job's context is gone.
func (s store) writeResult(ctx context.Context, queue, jobID, notify string, data []byte) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := writeResultScript.Run(ctx, s.rdb, []string{taskKey(queue, jobID)}, data, notify).Err(); err != nil {
		return fmt.Errorf("jobs: write result of %s: %w", jobID, err)
	}
	return nil
}

// queueResult queues on pipe what writeResult does, for a caller that
// sends it with other commands (sandboxpool.Pool.ReleaseWith). Eval, not
// EvalSha: a pipeline cannot fall back when Redis lost its scripts.
func (s store) queueResult(ctx context.Context, pipe redis.Pipeliner, queue, jobID, notify string, data []byte) *redis.Cmd {
	return writeResultScript.Eval(ctx, pipe, []string{taskKey(queue, jobID)}, data, notify)
}

// deliveryChecks are what holds back a delivery of job jobID of p: its
// result, already written, and a cancel request (either ends the delivery
// without running the command), and the job enqueued before it for the
// same task, until that one has ended (a result, archived, or gone), when
// ordered. The pool checks them when it takes the task's lease
// (sandboxpool.Pool.AcquireUnless).
func (s store) deliveryChecks(queue, jobID string, p *ExecPayload, ordered bool) []sandboxpool.Check {
	checks := []sandboxpool.Check{{Key: taskKey(queue, jobID), Field: "result"}, {Key: s.cancelKey(jobID)}}
	if ordered && p.AfterID != "" && p.AfterQueue != "" && p.AfterID != jobID {
		checks = append(checks, sandboxpool.Check{Key: taskKey(p.AfterQueue, p.AfterID), Field: "result",
			Wait: true, Settled: []string{"archived", "completed"}})
	}
	return checks
}

// chainKey holds the last job enqueued for a task: the next one runs after
// it.
func (s store) chainKey(taskID string) string { return s.prefix + "last:" + taskID }

// chainScript records a task's newest job and returns the one before it
// ({queue, id}, false for none). A job that exists already (enqueued
// again: asynq will refuse it) changes nothing and gets nothing, so that
// the job after it still follows the task's real last job.
//
// KEYS: the chain key, the job's asynq task key. ARGV: queue, job id, TTL
// ms.
var chainScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[2]) == 1 then return {} end
local prev = redis.call('HMGET', KEYS[1], 'queue', 'id')
redis.call('HSET', KEYS[1], 'queue', ARGV[1], 'id', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return prev
`)

// unchainScript undoes chainScript for a job that was not enqueued after
// all, if it is still the task's newest: the next job follows the one
// before it instead. KEYS: the chain key. ARGV: job id, the previous
// job's queue and id ("" for none), TTL ms.
var unchainScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
	redis.call('DEL', KEYS[1])
else
	redis.call('HSET', KEYS[1], 'queue', ARGV[2], 'id', ARGV[3])
	redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
`)

// chain records jobID as taskID's newest job and returns the job before it
// ("" for none).
func (s store) chain(ctx context.Context, taskID, queue, jobID string, ttl time.Duration) (prevQueue, prevID string, err error) {
	reply, err := chainScript.Run(ctx, s.rdb, []string{s.chainKey(taskID), taskKey(queue, jobID)}, queue, jobID, ttl.Milliseconds()).Slice()
	if err != nil {
		return "", "", fmt.Errorf("jobs: order after the task's last job: %w", err)
	}
	if len(reply) == 2 {
		prevQueue, _ = reply[0].(string)
		prevID, _ = reply[1].(string)
	}
	if prevID == jobID {
		return "", "", nil
	}
	return prevQueue, prevID, nil
}

// unchain undoes chain for a job whose enqueue failed.
func (s store) unchain(ctx context.Context, taskID, jobID, prevQueue, prevID string, ttl time.Duration) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	return unchainScript.Run(ctx, s.rdb, []string{s.chainKey(taskID)}, jobID, prevQueue, prevID, ttl.Milliseconds()).Err()
}

// deliveryState is what a delivery of a job checks before it runs: a result
// already written (an earlier delivery finished but asynq did not record
// it) and a cancel request. One round trip.
func (s store) deliveryState(ctx context.Context, queue, jobID string) (result []byte, cancelled bool, err error) {
	pipe := s.rdb.Pipeline()
	res := pipe.HGet(ctx, taskKey(queue, jobID), "result")
	can := pipe.Exists(ctx, s.cancelKey(jobID))
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, false, fmt.Errorf("jobs: read state of %s: %w", jobID, err)
	}
	b, err := res.Bytes()
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, false, fmt.Errorf("jobs: read result of %s: %w", jobID, err)
	}
	return b, can.Val() == 1, nil
}

// markCancelled records that jobID must not run (or must stop). It is kept
// as long as results are.
func (s store) markCancelled(ctx context.Context, jobID string, ttl time.Duration) error {
	if err := s.rdb.Set(ctx, s.cancelKey(jobID), 1, ttl).Err(); err != nil {
		return fmt.Errorf("jobs: mark %s cancelled: %w", jobID, err)
	}
	return nil
}

// taskState is one job's entry as the producer's sweep sees it.
type taskState struct {
	exists bool
	state  string // asynq's state name: pending, active, retry, archived, completed, …
	result []byte
}

// lookup reads the state and result of many jobs in one round trip.
func (s store) lookup(ctx context.Context, queue string, ids []string) ([]taskState, error) {
	pipe := s.rdb.Pipeline()
	cmds := make([]*redis.SliceCmd, len(ids))
	for i, id := range ids {
		cmds[i] = pipe.HMGet(ctx, taskKey(queue, id), "state", "result")
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("jobs: look up %d jobs: %w", len(ids), err)
	}
	out := make([]taskState, len(ids))
	for i, c := range cmds {
		v := c.Val()
		if len(v) != 2 {
			continue
		}
		if st, ok := v[0].(string); ok {
			out[i].exists = true
			out[i].state = st
		}
		if r, ok := v[1].(string); ok && r != "" {
			out[i].result = []byte(r)
		}
	}
	return out, nil
}

// cancelRequested reports whether the job was flagged cancelled. It runs
// when the job's context has ended, with its own short timeout; when Redis
// does not answer it says no.
func (s store) cancelRequested(ctx context.Context, jobID string) bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	n, err := s.rdb.Exists(ctx, s.cancelKey(jobID)).Result()
	return err == nil && n == 1
}
