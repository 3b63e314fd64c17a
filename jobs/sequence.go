package jobs

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// A task's commands form a sequence, per queue: they run one after the
// other, in the order they were enqueued, for as long as a run lasts.
//
// Only the sequence's head is runnable. The jobs behind it are parked
// inside asynq, as scheduled tasks due in the year 2200 (parkedAt), so
// that asynq keeps doing for them what it does for any job: the same id
// enqueued twice is one job, `enqueue -result` and `-cancel` find it, the
// dashboard lists it (under Scheduled), its retention applies after it
// runs. Parked jobs cost nothing while they wait: asynq's forwarder reads
// only the due end of the scheduled set.
//
// The step that writes a job's result (resultScript) hands the sequence
// over to the next job, in the same atomic step: it promotes it from the
// scheduled set to the pending list, as asynq's own forwarder does. So
// there is no moment when a result is written and the next job is not yet
// runnable, whatever crashes.
//
//	enqueue:  join ──head──▶ enqueue runnable
//	               └─wait──▶ enqueue parked
//	          (an enqueue that took long: confirm, rejoin if the repair passed it)
//	late:     (every worker, 2/s) promote a head handed the turn mid-enqueue
//	result:   write result + hand over (pop the next waiting job, promote it)
//	repair:   (reaper's tick) heads that are gone, archived, or parked
//
// Keys (Q = the queue, T = the task id), all in the queue's hash slot, next
// to asynq's asynq:{Q}:… keys, so that every script touches one slot:
//
//	boxq:{Q}:seq:T    hash   head: the job whose turn it is; since: when (ms)
//	boxq:{Q}:seqw:T   list   the jobs waiting behind the head, in order
//	boxq:{Q}:seqheads zset   T → since, for the repair: heads to look at
//	boxq:{Q}:seqlate  zset   T → when, heads handed the turn while being
//	                         enqueued, for the workers' late-head loop
//	boxq:{Q}:seqlate:ended
//	                  zset   job id → when, waiting jobs given their result
//	                         (cancel, terminate) while asynq had them
//	                         active, for the same loop (settle)
//
// None of them expires: a sequence lives while it has jobs (runs last
// days), and its keys are deleted when its last job ends.
//
// What ends a head's turn: its result (any status, "error" included), a
// cancel (a "cancelled" result), or its removal from the dashboard (delete
// or archive: the repair notices on the reaper's next tick). A command
// that fails does not stop the task: the next job runs all the same, from
// the cwd of the last command that reported one.
//
// A task's jobs in different queues are separate sequences: keys of two
// queues live in different hash slots of a Redis Cluster. They still never
// run at the same time (the pool's lease).

// parkedAt is when a parked job is due: never, in practice.
var parkedAt = time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC)

// goneHeadGrace is the least time a head whose job does not exist keeps its
// turn, whatever SeqRepairAfter says: a producer whose enqueue is slower
// than slowEnqueue confirms its place, and must find it kept until then.
const goneHeadGrace = 2 * slowEnqueue

// DefaultSeqRepairAfter is how long a head may stay as it is before the
// repair looks at it, and how long a head whose job does not exist keeps
// its turn: a producer between join and enqueue takes milliseconds.
const DefaultSeqRepairAfter = 30 * time.Second

// promoteLua defines promote, which makes a parked (or put back: "retry")
// job runnable, as asynq's forwarder does, and wakes the queue's idle
// workers (wake.go). It needs P (asynq's key prefix of the queue), NOWNS
// (now, ns) and WAKE (wakeLua).
const promoteLua = `
local function promote(id)
	local tk = P .. 't:' .. id
	local st = redis.call('HGET', tk, 'state')
	if (st == 'scheduled' or st == 'retry') and redis.call('ZREM', P .. st, id) == 1 then
		redis.call('LPUSH', P .. 'pending', id)
		redis.call('HSET', tk, 'state', 'pending', 'pending_since', NOWNS)
		redis.call('PUBLISH', WAKE, '')
	end
end
`

// seqLib is the start of every sequence script.
//
// Times in the sequence keys are Redis's own (TIME), so that producers and
// workers with clocks apart agree on them.
//
// KEYS: 1 seq, 2 seq waiting list, 3 seq heads. ARGV: 1 asynq's key prefix
// of the queue ("asynq:{Q}:"), 2 the queue's late-heads set
// (boxq:{Q}:seqlate), 3 now ns (asynq's pending_since),
// 4 the parked score, 5 task id ("" for a job in no sequence); each
// script's own arguments follow.
const seqLib = `
local P, LATE, NOWNS, PARK, TASK = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local T = redis.call('TIME')
local NOWMS = tonumber(T[1]) * 1000 + math.floor(tonumber(T[2]) / 1000)
local SEQ, SEQW, HEADS = KEYS[1], KEYS[2], KEYS[3]
` + wakeLua + promoteLua + `
-- settle makes a job that has just been given its result while it waited
-- runnable, so that a worker acks it. One that asynq has active (a delayed
-- job between its join and its return to the retry set, delayed.go) would
-- go back parked until 2200, its result unseen: it is noted in the ended
-- set (P is ARGV[1], the ended set LATE .. ':ended'), and the workers'
-- late-head loop promotes it once it is back (seqEndedScript).
local function settle(id)
	if redis.call('HGET', P .. 't:' .. id, 'state') == 'active' then
		redis.call('ZADD', LATE .. ':ended', NOWMS, id)
	else
		promote(id)
	end
end
-- handover gives the turn to the next waiting job that has not ended
-- (removed from the dashboard while waiting, or a second place of a job
-- sent twice that has its result), or ends the sequence.
-- A next job whose task hash does not exist yet is being enqueued: it
-- gets the turn, and its producer's confirm promotes it.
local function handover()
	while true do
		local id = redis.call('LPOP', SEQW)
		if not id then
			redis.call('DEL', SEQ)
			redis.call('ZREM', HEADS, TASK)
			return ''
		end
		local st, res = unpack(redis.call('HMGET', P .. 't:' .. id, 'state', 'result'))
		if st ~= 'archived' and st ~= 'completed' and not res then
			redis.call('HSET', SEQ, 'head', id, 'since', NOWMS)
			redis.call('ZADD', HEADS, NOWMS, TASK)
			if st == 'active' then
				-- A delayed job between its join and its return to the
				-- retry set (delayed.go), or one run out of turn: the
				-- late-head loop promotes it once it is back.
				redis.call('ZADD', LATE, NOWMS, TASK)
			elseif st then
				promote(id)
			else
				-- Being enqueued (joined, not yet in asynq): the workers'
				-- late-head loop promotes it once it is there.
				redis.call('ZADD', LATE, NOWMS, TASK)
			end
			return id
		end
	end
end
`

// seqJoinScript puts a job at the end of its task's sequence: {1} it is
// the head (enqueue it runnable), {2} it waits (enqueue it parked), {0} the
// job exists already (the same id twice is one job). A job sent again
// after its producer died between join and enqueue finds its place kept
// when it was the head; a waiting one joins again at the end (the first
// place is skipped when its turn comes: by then the job has ended).
//
// KEYS: seqLib's, 4 the job's task hash. ARGV: seqLib's, 6 job id.
var seqJoinScript = redis.NewScript(seqLib + `
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local head = redis.call('HGET', SEQ, 'head')
if not head then
	redis.call('HSET', SEQ, 'head', ARGV[6], 'since', NOWMS)
	redis.call('ZADD', HEADS, NOWMS, TASK)
	return 1
end
if head == ARGV[6] then return 1 end
redis.call('RPUSH', SEQW, ARGV[6])
return 2
`)

// seqConfirmScript promotes a job just enqueued parked that became the head
// meanwhile (its predecessor ended between join and enqueue): {1}. A job
// still waiting is left so ({0}; it is found from the list's end, where it
// was just put, so this costs no scan). A job that lost its place (its
// enqueue took so long that the repair passed over it) joins again at the
// end: {2}, as the head, {3} waiting.
//
// KEYS: seqLib's. ARGV: seqLib's, 6 job id.
var seqConfirmScript = redis.NewScript(seqLib + `
local head = redis.call('HGET', SEQ, 'head')
if head == ARGV[6] then
	promote(ARGV[6])
	return 1
end
if redis.call('LPOS', SEQW, ARGV[6], 'RANK', -1) then return 0 end
if not head then
	redis.call('HSET', SEQ, 'head', ARGV[6], 'since', NOWMS)
	redis.call('ZADD', HEADS, NOWMS, TASK)
	promote(ARGV[6])
	return 2
end
redis.call('RPUSH', SEQW, ARGV[6])
return 3
`)

// seqLeaveScript takes a waiting job out of its sequence, writes its
// result (a cancel), and makes it runnable, so that a worker acks it (a
// delivery that finds a result runs nothing) and asynq's retention applies: {1} done, {0} it has a result already, {2} it is the
// head (cancel it as a job that may run), {3} it is not waiting here.
//
// KEYS: seqLib's, 4 the job's task hash. ARGV: seqLib's, 6 job id, 7 the
// result.
var seqLeaveScript = redis.NewScript(seqLib + `
if redis.call('HEXISTS', KEYS[4], 'result') == 1 then return 0 end
if redis.call('HGET', SEQ, 'head') == ARGV[6] then return 2 end
if redis.call('LREM', SEQW, 1, ARGV[6]) == 0 then return 3 end
if redis.call('EXISTS', KEYS[4]) == 1 then
	redis.call('HSET', KEYS[4], 'result', ARGV[7])
	settle(ARGV[6])
end
return 1
`)

// seqRepairScript looks at a head that has kept its turn for a while:
// gone (deleted from the dashboard, or its producer died between join and
// enqueue) for longer than the cutoff, ended without handing over
// (archived from the dashboard), or left parked (its producer died before
// confirm). Replies: 0 nothing to do (looked at again later), 1 handed
// over past a gone head, 2 past an ended one, 3 promoted.
//
// KEYS: seqLib's. ARGV: seqLib's, 6 how long a gone head keeps its turn (ms).
var seqRepairScript = redis.NewScript(seqLib + `
local head = redis.call('HGET', SEQ, 'head')
if not head then
	redis.call('ZREM', HEADS, TASK)
	return 0
end
local tk = P .. 't:' .. head
local st, res = unpack(redis.call('HMGET', tk, 'state', 'result'))
if not st then
	if tonumber(redis.call('HGET', SEQ, 'since') or '0') <= NOWMS - tonumber(ARGV[6]) then
		handover()
		return 1
	end
	return 0
end
if res or st == 'archived' or st == 'completed' then
	handover()
	return 2
end
if st == 'scheduled' or st == 'retry' then
	local score = redis.call('ZSCORE', P .. st, head)
	if score and tonumber(score) >= PARK then
		promote(head)
		return 3
	end
end
redis.call('ZADD', HEADS, NOWMS, TASK)
return 0
`)

// seqStopScript cancels waiting jobs of a terminated task: each one still
// waiting leaves the sequence, gets its result, and is made runnable, so
// that a worker acks it (a delivery that finds a result runs nothing) and
// asynq's retention applies. It returns the head ("" none).
//
// KEYS: seqLib's. ARGV: seqLib's, then job id and result of each job.
var seqStopScript = redis.NewScript(seqLib + `
for i = 6, #ARGV - 1, 2 do
	local id = ARGV[i]
	if redis.call('LREM', SEQW, 1, id) == 1 then
		local tk = P .. 't:' .. id
		if redis.call('EXISTS', tk) == 1 and redis.call('HEXISTS', tk, 'result') == 0 then
			redis.call('HSET', tk, 'result', ARGV[i + 1])
			settle(id)
		end
	end
end
return redis.call('HGET', SEQ, 'head') or ''
`)

// stop cancels the task's waiting jobs with result (a function of the job
// id), a page at a time, and returns the head ("" none) and how many it
// cancelled.
func (q sequence) stop(ctx context.Context, rdb redis.UniversalClient, result func(jobID string) ([]byte, error)) (head string, n int, err error) {
	for {
		ids, err := rdb.LRange(ctx, q.waitKey(), 0, 499).Result()
		if err != nil {
			return "", n, fmt.Errorf("jobs: read the sequence of task %q: %w", q.task, err)
		}
		more := make([]any, 0, 2*len(ids))
		for _, id := range ids {
			r, err := result(id)
			if err != nil {
				return "", n, err
			}
			more = append(more, id, r)
		}
		head, err = seqStopScript.Run(ctx, rdb, q.keys(), q.args(time.Now(), more...)...).Text()
		if err != nil {
			return "", n, fmt.Errorf("jobs: cancel the waiting jobs of task %q: %w", q.task, err)
		}
		n += len(ids)
		if len(ids) < 500 {
			return head, n, nil
		}
	}
}

// seqLateScript promotes a head that was handed the turn while it was
// being enqueued (its hash did not exist yet), once its enqueue is done,
// or while asynq had it active (a delayed job between its join and its
// return to the retry set, delayed.go), once it is back:
// {1} promoted (or runnable already), {0} still being enqueued, or still
// active (looked at again; the repair passes over a job that never comes).
//
// KEYS: seqLib's. ARGV: seqLib's.
var seqLateScript = redis.NewScript(seqLib + `
local head = redis.call('HGET', SEQ, 'head')
if head then
	local st = redis.call('HGET', P .. 't:' .. head, 'state')
	if not st or st == 'active' then return 0 end
end
if head then promote(head) end
redis.call('ZREM', LATE, TASK)
return 1
`)

// seqEndedScript promotes a job noted in the ended set (settle: given its
// result while asynq had it active) once asynq has put it back, so that a
// worker acks it: {1} done (promoted, or nothing left to do), {0} still
// active (looked at again).
//
// KEYS: 1 the ended set. ARGV: 1 asynq's key prefix of the queue, 2 now
// ns, 3 job id.
var seqEndedScript = redis.NewScript(`
local P, NOWNS = ARGV[1], ARGV[2]
local LATE = string.sub(KEYS[1], 1, #KEYS[1] - #':ended')
` + wakeLua + promoteLua + `
if redis.call('HGET', P .. 't:' .. ARGV[3], 'state') == 'active' then return 0 end
promote(ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[3])
return 1
`)

// promoteLate runs seqLateScript over queue's late heads, and
// seqEndedScript over its ended jobs. Every worker runs it twice a second:
// the sets are empty but for the moment a job is being enqueued as its
// predecessor ends, so it costs one round trip.
func (s store) promoteLate(ctx context.Context, queue string) error {
	// All of them: entries of producers that died mid-enqueue stay until
	// the repair passes over them, and must not hold up the others.
	var lateCmd, endedCmd *redis.StringSliceCmd
	if _, err := s.rdb.Pipelined(ctx, func(pipe redis.Pipeliner) error {
		lateCmd = pipe.ZRange(ctx, seqLateKey(s.prefix, queue), 0, -1)
		endedCmd = pipe.ZRange(ctx, seqEndedKey(s.prefix, queue), 0, -1)
		return nil
	}); err != nil {
		return err
	}
	tasks, ended := lateCmd.Val(), endedCmd.Val()
	var firstErr error
	for _, id := range ended {
		err := seqEndedScript.Run(ctx, s.rdb, []string{seqEndedKey(s.prefix, queue)}, "asynq:{"+queue+"}:", time.Now().UnixNano(), id).Err()
		if err != nil && firstErr == nil {
			firstErr = fmt.Errorf("jobs: settle ended job %s: %w", id, err)
		}
	}
	for _, task := range tasks {
		q := s.sequence(queue, task)
		if err := seqLateScript.Run(ctx, s.rdb, q.keys(), q.args(time.Now())...).Err(); err != nil && firstErr == nil {
			firstErr = fmt.Errorf("jobs: promote the late head of task %q: %w", task, err)
		}
	}
	return firstErr
}

// sequence names one task's sequence in one queue.
type sequence struct {
	queue, task string
	prefix      string // boxq's key prefix
}

func (s store) sequence(queue, task string) sequence {
	return sequence{queue: queue, task: task, prefix: s.prefix}
}

func (q sequence) key() string     { return q.prefix + "{" + q.queue + "}:seq:" + q.task }
func (q sequence) waitKey() string { return q.prefix + "{" + q.queue + "}:seqw:" + q.task }
func seqHeadsKey(prefix, queue string) string {
	return prefix + "{" + queue + "}:seqheads"
}
func seqLateKey(prefix, queue string) string {
	return prefix + "{" + queue + "}:seqlate"
}

// seqEndedKey is the ended set: seqLib's settle derives it from the
// late-heads set's name.
func seqEndedKey(prefix, queue string) string {
	return seqLateKey(prefix, queue) + ":ended"
}

// keys and args are seqLib's KEYS and ARGV, with more of each after them.
func (q sequence) keys(more ...string) []string {
	return append([]string{q.key(), q.waitKey(), seqHeadsKey(q.prefix, q.queue)}, more...)
}

func (q sequence) args(now time.Time, more ...any) []any {
	return append([]any{"asynq:{" + q.queue + "}:", seqLateKey(q.prefix, q.queue), now.UnixNano(), parkedAt.Unix(), q.task}, more...)
}

// Places a job can be given by join.
const (
	joinExists = 0
	joinHead   = 1
	joinWait   = 2
)

func (q sequence) join(ctx context.Context, rdb redis.Scripter, jobID string) (int64, error) {
	n, err := seqJoinScript.Run(ctx, rdb, q.keys(taskKey(q.queue, jobID)), q.args(time.Now(), jobID)...).Int64()
	if err != nil {
		return 0, fmt.Errorf("jobs: join the sequence of task %q: %w", q.task, err)
	}
	return n, nil
}

func (q sequence) confirm(ctx context.Context, rdb redis.Scripter, jobID string) error {
	if err := seqConfirmScript.Run(ctx, rdb, q.keys(), q.args(time.Now(), jobID)...).Err(); err != nil {
		return fmt.Errorf("jobs: confirm %s in the sequence of task %q: %w", jobID, q.task, err)
	}
	return nil
}

// Outcomes of leave.
const (
	leaveHasResult = 0
	leaveDone      = 1
	leaveIsHead    = 2
	leaveNotHere   = 3
)

func (q sequence) leave(ctx context.Context, rdb redis.Scripter, jobID string, result []byte) (int64, error) {
	n, err := seqLeaveScript.Run(ctx, rdb, q.keys(taskKey(q.queue, jobID)), q.args(time.Now(), jobID, result)...).Int64()
	if err != nil {
		return 0, fmt.Errorf("jobs: take %s out of the sequence of task %q: %w", jobID, q.task, err)
	}
	return n, nil
}

// seqPlace is where a waiting job stands in its task's sequence.
type seqPlace struct {
	// Head is the job whose turn it is.
	Head string
	// Ahead counts the jobs before this one, the head included.
	Ahead int
}

// place finds where jobID waits; ok is false when it is not waiting.
func (q sequence) place(ctx context.Context, rdb redis.Cmdable, jobID string) (seqPlace, bool, error) {
	head, err := rdb.HGet(ctx, q.key(), "head").Result()
	if errors.Is(err, redis.Nil) || head == jobID {
		return seqPlace{}, false, nil
	}
	if err != nil {
		return seqPlace{}, false, fmt.Errorf("jobs: read the sequence of task %q: %w", q.task, err)
	}
	i, err := rdb.LPos(ctx, q.waitKey(), jobID, redis.LPosArgs{}).Result()
	if errors.Is(err, redis.Nil) {
		return seqPlace{}, false, nil
	}
	if err != nil {
		return seqPlace{}, false, fmt.Errorf("jobs: find %s in the sequence of task %q: %w", jobID, q.task, err)
	}
	return seqPlace{Head: head, Ahead: int(i) + 1}, true, nil
}

// repairSequences runs the repair over the heads of queue that have kept
// their turn for longer than after, a page at a time. Its cost
// follows those heads, not the number of waiting jobs. It returns how many
// it moved on.
func (s store) repairSequences(ctx context.Context, queue string, now time.Time, after time.Duration) (int, error) {
	heads := seqHeadsKey(s.prefix, queue)
	rnow, err := s.rdb.Time(ctx).Result()
	if err != nil {
		return 0, fmt.Errorf("jobs: repair sequences of queue %q: %w", queue, err)
	}
	cutoff := rnow.Add(-after).UnixMilli()
	tasks, err := s.rdb.ZRangeArgs(ctx, redis.ZRangeArgs{Key: heads, Start: "-inf", Stop: strconv.FormatInt(cutoff, 10), ByScore: true, Count: 1000}).Result()
	if err != nil {
		return 0, fmt.Errorf("jobs: repair sequences of queue %q: %w", queue, err)
	}
	moved := 0
	for _, task := range tasks {
		q := s.sequence(queue, task)
		n, err := seqRepairScript.Run(ctx, s.rdb, q.keys(), q.args(now, max(after, goneHeadGrace).Milliseconds())...).Int64()
		if err != nil {
			return moved, fmt.Errorf("jobs: repair the sequence of task %q: %w", task, err)
		}
		if n > 0 {
			moved++
		}
	}
	return moved, nil
}
