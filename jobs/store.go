package jobs

import (
	"cmp"
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

// resultScript stores a job's result, publishes it, and hands the job's
// sequence over to the next job, in one atomic step (sequence.go).
//
// The write is fenced: with an owner token, it is refused ({0}) unless the
// job's hash still names that owner (the lease token that last took the
// job: a worker that stalled while a rescuer took over, or a rescuer that
// lost to the job's own delivery, writes nothing). A job that has a result
// already keeps it ({2}): a job gets one result, published once. It never
// creates the task hash: a result for a task that asynq has already
// deleted would otherwise linger without expiry; nothing is published then
// ({3}), and the sequence still moves on.
//
// KEYS: seqLib's, 4 the job's task hash. ARGV: seqLib's (task "" for a job
// in no sequence), 6 result, 7 notify channel ("" none), 8 job id, 9 owner
// token ("" unfenced), 10 the queue's done channel (doneChannel).
//
// Besides the result itself on the enqueuer's notify channel, the job id
// goes on its queue's done channel, so that any listener hears of any job,
// whoever enqueued it (a Hub). Only the id: a listener that waits for the
// job reads the result, and one that does not pays a few bytes, not the
// output. A script's PUBLISH reaches every node of a Redis Cluster.
var resultScript = redis.NewScript(seqLib + `
local tk = KEYS[4]
local wrote = 3
if redis.call('EXISTS', tk) == 1 then
	if ARGV[9] ~= '' and redis.call('HGET', tk, 'boxq_owner') ~= ARGV[9] then return 0 end
	if redis.call('HEXISTS', tk, 'result') == 1 then
		wrote = 2
	else
		redis.call('HSET', tk, 'result', ARGV[6])
		wrote = 1
	end
end
if wrote == 1 then
	if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[6]) end
	redis.call('PUBLISH', ARGV[10], ARGV[8])
end
if TASK ~= '' and redis.call('HGET', SEQ, 'head') == ARGV[8] then handover() end
return wrote
`)

// Replies of resultScript.
const (
	resultFenced  = 0
	resultWritten = 1
	resultHadOne  = 2
	resultNoJob   = 3
)

// ErrFenced means a result write was refused: the job is in other hands
// (a rescuer took it over, or the job's own later delivery).
var ErrFenced = errors.New("jobs: fenced out: the job is in other hands")

// resultWrite is one result to write.
type resultWrite struct {
	queue, jobID, notify string
	seqTask              string // the task whose sequence moves on ("" none)
	owner                string // fencing token ("" unfenced)
	data                 []byte
}

func (w resultWrite) keysArgs(prefix string) ([]string, []any) {
	q := sequence{queue: w.queue, task: w.seqTask, prefix: prefix}
	return q.keys(taskKey(w.queue, w.jobID)), q.args(time.Now(), w.data, w.notify, w.jobID, w.owner, doneChannel(prefix, w.queue))
}

// doneChannel is the pub/sub channel on which the ids of a queue's jobs
// are published as their results are written.
func doneChannel(prefix, queue string) string { return prefix + "done:" + queue }

func resultErr(jobID string, n int64, err error) error {
	switch {
	case err != nil:
		return fmt.Errorf("jobs: write result of %s: %w", jobID, err)
	case n == resultFenced:
		return fmt.Errorf("jobs: write result of %s: %w", jobID, ErrFenced)
	case n == resultWritten, n == resultHadOne, n == resultNoJob:
		return nil
	}
	return fmt.Errorf("jobs: write result of %s: unexpected reply %d", jobID, n)
}

// store holds the few Redis keys boxq keeps next to asynq's.
type store struct {
	rdb    redis.UniversalClient
	prefix string
}

func (s store) cancelKey(jobID string) string { return s.prefix + "cancel:" + jobID }

// writeResult writes a result (resultScript). It uses its own bounded
// context: a result must be written even when the job's context is gone.
func (s store) writeResult(ctx context.Context, w resultWrite) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	keys, args := w.keysArgs(s.prefix)
	n, err := resultScript.Run(ctx, s.rdb, keys, args...).Int64()
	return resultErr(w.jobID, n, err)
}

// queueResult queues on pipe what writeResult does, for a caller that
// sends it with other commands (sandboxpool.Pool.ReleaseWith), by EvalSha:
// the script's text is not sent each time. A pipeline cannot fall back when
// Redis does not know the script: the caller sends it again with
// writeResult on NOSCRIPT.
func (s store) queueResult(ctx context.Context, pipe redis.Pipeliner, w resultWrite) *redis.Cmd {
	keys, args := w.keysArgs(s.prefix)
	return resultScript.EvalSha(ctx, pipe, keys, args...)
}

// takeOverScript makes a rescuer the owner of a job's results, unless the
// job has a result already ({2}) or a later lease took it ({0}: the owner
// token is larger than the rescuer's). {1}: taken over.
//
// KEYS: the job's task hash. ARGV: the rescuer's token.
var takeOverScript = redis.NewScript(`
if redis.call('HEXISTS', KEYS[1], 'result') == 1 then return 2 end
local owner = tonumber(redis.call('HGET', KEYS[1], 'boxq_owner') or '0')
if owner > tonumber(ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'boxq_owner', ARGV[1]) end
return 1
`)

// takeOver makes owner the writer of jobID's result (takeOverScript).
func (s store) takeOver(ctx context.Context, queue, jobID, owner string) (int64, error) {
	n, err := takeOverScript.Run(ctx, s.rdb, []string{taskKey(queue, jobID)}, owner).Int64()
	if err != nil {
		return 0, fmt.Errorf("jobs: take over %s: %w", jobID, err)
	}
	return n, nil
}

// Checks that hold back a delivery, in this order (ExecHandler.vetoed).
const (
	vetoResult = iota // the job has a result already
	vetoCancel        // the job was cancelled
	vetoTurn          // another job of the task's sequence has the turn
)

// deliveryChecks are what holds back a delivery of job jobID of p: its
// result, already written, a cancel request, and, for a job of a
// sequence, another job's turn. The pool checks them when it takes the
// task's lease (sandboxpool.Pool.AcquireFor).
func (s store) deliveryChecks(queue, jobID string, p *ExecPayload) []sandboxpool.Check {
	checks := []sandboxpool.Check{{Key: taskKey(queue, jobID), Field: "result"}, {Key: s.cancelKey(jobID)}}
	if p.Seq {
		checks = append(checks, sandboxpool.Check{Key: s.sequence(queue, p.TaskID).key(), Field: "head", Other: jobID})
	}
	return checks
}

// markCancelled records that jobID must not run (or must stop). It is kept
// as long as results are.
func (s store) markCancelled(ctx context.Context, jobID string, ttl time.Duration) error {
	return s.markCancelledFor(ctx, jobID, "", ttl)
}

// markCancelledFor is markCancelled with the reason the result gives in
// its "error" ("" none).
func (s store) markCancelledFor(ctx context.Context, jobID, reason string, ttl time.Duration) error {
	if err := s.rdb.Set(ctx, s.cancelKey(jobID), cmp.Or(reason, "1"), ttl).Err(); err != nil {
		return fmt.Errorf("jobs: mark %s cancelled: %w", jobID, err)
	}
	return nil
}

// taskState is one job's entry as the producer's sweep sees it.
type taskState struct {
	exists bool
	state  string // asynq's state name: pending, active, retry, archived, completed, …
	result []byte
	wait   string // the worker's note of why it came back (waitField)
	parked bool   // scheduled at parkedAt: waiting in its task's sequence
}

// lookup reads the state and result of many jobs in one round trip (two
// when some are scheduled: whether they are parked is in the scheduled
// set's scores).
func (s store) lookup(ctx context.Context, queue string, ids []string) ([]taskState, error) {
	pipe := s.rdb.Pipeline()
	cmds := make([]*redis.SliceCmd, len(ids))
	for i, id := range ids {
		cmds[i] = pipe.HMGet(ctx, taskKey(queue, id), "state", "result", waitField)
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("jobs: look up %d jobs: %w", len(ids), err)
	}
	out := make([]taskState, len(ids))
	var scheduled []int
	for i, c := range cmds {
		v := c.Val()
		if len(v) != 3 {
			continue
		}
		if st, ok := v[0].(string); ok {
			out[i].exists = true
			out[i].state = st
			if st == "scheduled" {
				scheduled = append(scheduled, i)
			}
		}
		if r, ok := v[1].(string); ok && r != "" {
			out[i].result = []byte(r)
		}
		if w, ok := v[2].(string); ok {
			out[i].wait = w
		}
	}
	if len(scheduled) > 0 {
		zset := "asynq:{" + queue + "}:scheduled"
		scores := make([]*redis.FloatCmd, len(scheduled))
		for k, i := range scheduled {
			scores[k] = pipe.ZScore(ctx, zset, ids[i])
		}
		if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("jobs: look up %d scheduled jobs: %w", len(scheduled), err)
		}
		for k, i := range scheduled {
			if at, err := scores[k].Result(); err == nil && at >= float64(parkedAt.Unix()) {
				out[i].parked = true
			}
		}
	}
	return out, nil
}

// cancelReason returns why a cancelled job was cancelled, when a reason was
// given ("" otherwise, or when Redis does not answer).
func (s store) cancelReason(ctx context.Context, jobID string) string {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	v, err := s.rdb.Get(ctx, s.cancelKey(jobID)).Result()
	if err != nil || v == "1" {
		return ""
	}
	return v
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
