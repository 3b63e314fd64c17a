package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

// What a job that is not running waits for (JobStatus.WaitingFor).
const (
	// WaitWorker: the job is runnable and no worker has taken it yet: no
	// worker serves its queue, or all are busy.
	WaitWorker = "worker"
	// WaitTurn: another job of its task runs first (its sequence, or the
	// task's lease held by another delivery).
	WaitTurn = "turn"
	// WaitCapacity: the pool (-max-sandboxes) or the gateway (429) is full.
	WaitCapacity = "capacity"
	// WaitRetry: an attempt failed (a fault) and the job is retried after
	// a backoff.
	WaitRetry = "retry"
	// WaitSchedule: the job runs at a set time (run_at) not yet reached.
	WaitSchedule = "schedule"
)

// Job states (JobStatus.State).
const (
	StateScheduled = "scheduled" // due later (WaitSchedule)
	StatePending   = "pending"   // runnable, waiting for a worker
	StateWaiting   = "waiting"   // waiting for its turn or for capacity
	StateRunning   = "running"   // a worker handles it
	StateRetrying  = "retrying"  // an attempt failed; it runs again later
	StateDone      = "done"      // it has a result
	StateFailed    = "failed"    // archived by asynq without a result
)

// JobStatus is where a job stands.
type JobStatus struct {
	ID     string `json:"id"`
	Queue  string `json:"queue"`
	TaskID string `json:"task_id,omitempty"`
	// State is one of the State* constants.
	State string `json:"state"`
	// WaitingFor is one of the Wait* constants while the job waits
	// (scheduled, pending, waiting, retrying), "" otherwise.
	WaitingFor string `json:"waiting_for,omitempty"`
	// Behind is the job whose turn it is, and Ahead how many jobs of the
	// task come first (Behind included), for a job waiting in its task's
	// sequence.
	Behind string `json:"behind,omitempty"`
	Ahead  int    `json:"ahead,omitempty"`
	// LastError is what the last attempt met (the gateway's words for a
	// capacity wait), for a waiting, retrying or failed job.
	LastError string `json:"last_error,omitempty"`
	// NextRun is when a scheduled or retrying job runs next.
	NextRun time.Time `json:"next_run,omitzero"`
	// Result is set when State is StateDone.
	Result *Result `json:"result,omitempty"`
}

// String describes the status in a line, as the CLI prints it.
func (s JobStatus) String() string {
	var b strings.Builder
	b.WriteString(s.State)
	switch {
	case s.Behind != "":
		fmt.Fprintf(&b, " for its turn in task %q: behind job %s, %d ahead", s.TaskID, s.Behind, s.Ahead)
	case s.WaitingFor == WaitWorker:
		fmt.Fprintf(&b, " for a worker serving queue %q", s.Queue)
	case s.WaitingFor == WaitTurn:
		fmt.Fprintf(&b, " for its turn in task %q", s.TaskID)
	case s.WaitingFor == WaitCapacity:
		b.WriteString(" for capacity")
	}
	if !s.NextRun.IsZero() {
		fmt.Fprintf(&b, " (next run %s)", s.NextRun.UTC().Format(time.RFC3339))
	}
	if s.LastError != "" {
		fmt.Fprintf(&b, ": %s", s.LastError)
	}
	return b.String()
}

// waitField is the field of asynq's task hash where a worker notes why a
// job came back (the last attempt's wait kind and error), so that
// producers can tell waits apart without decoding asynq's own message.
const waitField = "boxq_wait"

// noteWaitScript writes the note only while the job exists (a note on a
// deleted job would recreate its hash) and only when it changed (a job
// waiting for its turn comes back every 200 ms with the same note).
var noteWaitScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1`)

// maxWaitNote bounds the error text kept in a note.
const maxWaitNote = 500

// noteWait records why a job's attempt ended without a result. It is
// best effort: a lost note only makes a status less precise.
func (s store) noteWait(ctx context.Context, t *asynq.Task, err error) {
	if errors.Is(err, context.Canceled) {
		return // a shutdown or a cancel: the job is back at once
	}
	id, _ := asynq.GetTaskID(ctx)
	queue, _ := asynq.GetQueueName(ctx)
	if id == "" || queue == "" {
		return
	}
	kind, msg := WaitRetry, err.Error()
	var rl *retryLater
	if errors.As(err, &rl) {
		kind, msg = rl.wait, rl.err.Error()
		if kind == "" {
			kind = WaitRetry
		}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	_ = noteWaitScript.Run(ctx, s.rdb, []string{taskKey(queue, id)}, waitField, kind+":"+shorten(msg, maxWaitNote)).Err()
}

// parseWaitNote splits a note into its kind and error text.
func parseWaitNote(note string) (kind, msg string) {
	kind, msg, _ = strings.Cut(note, ":")
	return kind, msg
}

// Status returns where a job stands. It returns an error wrapping
// ErrJobNotFound for a job no queue knows.
func (p *Producer) Status(ctx context.Context, jobID string) (JobStatus, error) {
	info, err := p.find(jobID)
	if err != nil {
		return JobStatus{}, err
	}
	st := JobStatus{ID: jobID, Queue: info.Queue}
	pl, isExec := payloadOf(info)
	if isExec {
		st.TaskID = pl.TaskID
	}
	if len(info.Result) > 0 {
		var r Result
		if err := json.Unmarshal(info.Result, &r); err != nil {
			return JobStatus{}, fmt.Errorf("jobs: decode result of %s: %w", jobID, err)
		}
		st.State, st.Result = StateDone, &r
		return st, nil
	}
	note, err := p.rdb.HGet(ctx, taskKey(info.Queue, jobID), waitField).Result()
	if err != nil && !errors.Is(err, redis.Nil) {
		return JobStatus{}, fmt.Errorf("jobs: look up %s: %w", jobID, err)
	}
	kind, msg := parseWaitNote(note)
	switch info.State {
	case asynq.TaskStateActive:
		st.State = StateRunning
	case asynq.TaskStatePending, asynq.TaskStateAggregating:
		st.State, st.WaitingFor = StatePending, WaitWorker
	case asynq.TaskStateScheduled:
		st.State, st.WaitingFor, st.NextRun = StateScheduled, WaitSchedule, info.NextProcessAt
		if isExec && pl.Seq && !info.NextProcessAt.Before(parkedAt) {
			st.State, st.WaitingFor, st.NextRun = StateWaiting, WaitTurn, time.Time{}
			place, waiting, err := p.store.sequence(info.Queue, pl.TaskID).place(ctx, p.rdb, jobID)
			if err != nil {
				return JobStatus{}, err
			}
			if waiting {
				st.Behind, st.Ahead = place.Head, place.Ahead
			}
		}
	case asynq.TaskStateRetry:
		switch kind {
		case WaitTurn, WaitCapacity:
			st.State, st.WaitingFor = StateWaiting, kind
			if kind == WaitTurn && isExec {
				// A delayed job that fell due behind another job of its
				// task waits in the retry set.
				place, waiting, err := p.store.sequence(info.Queue, pl.TaskID).place(ctx, p.rdb, jobID)
				if err != nil {
					return JobStatus{}, err
				}
				if waiting {
					st.Behind, st.Ahead = place.Head, place.Ahead
				}
			}
		case WaitSchedule:
			st.State, st.WaitingFor, st.NextRun = StateScheduled, WaitSchedule, info.NextProcessAt
		default:
			st.State, st.WaitingFor, st.NextRun = StateRetrying, WaitRetry, info.NextProcessAt
		}
		st.LastError = msg
		if st.LastError == "" {
			st.LastError = info.LastErr
		}
	case asynq.TaskStateArchived, asynq.TaskStateCompleted:
		st.State, st.LastError = StateFailed, info.LastErr
		if st.LastError == "" {
			st.LastError = "ended without a result"
		}
	default:
		st.State = info.State.String()
	}
	return st, nil
}

// WaitCounts counts a Waiter's outstanding jobs by what they wait for, as
// its last sweep saw them.
type WaitCounts struct {
	Running  int // a worker handles it
	Worker   int // runnable; no worker has taken it
	Turn     int // another job of its task runs first
	Capacity int // the pool or the gateway is full
	Retry    int // retried after a fault
	Schedule int // due later
}

// waitKindOf classifies one job of a sweep, from its asynq state, its wait
// note, and whether it is parked (its scheduled time is parkedAt).
func waitKindOf(state, note string, parked bool) string {
	switch state {
	case "active":
		return StateRunning
	case "pending", "aggregating":
		return WaitWorker
	case "scheduled":
		if parked {
			return WaitTurn
		}
		return WaitSchedule
	case "retry":
		switch kind, _ := parseWaitNote(note); kind {
		case WaitTurn, WaitCapacity, WaitSchedule:
			// WaitSchedule: a delayed job delivered before its run_at
			// (errNotDue), back until then; as Status says.
			return kind
		}
		return WaitRetry
	}
	return ""
}

func (c *WaitCounts) add(kind string) {
	switch kind {
	case StateRunning:
		c.Running++
	case WaitWorker:
		c.Worker++
	case WaitTurn:
		c.Turn++
	case WaitCapacity:
		c.Capacity++
	case WaitRetry:
		c.Retry++
	case WaitSchedule:
		c.Schedule++
	}
}

// TaskSequence is where a task's sequence stands in one queue.
type TaskSequence struct {
	Queue string `json:"queue"`
	// Head is the job whose turn it is ("" none).
	Head string `json:"head,omitempty"`
	// Waiting counts the jobs behind the head.
	Waiting int64 `json:"waiting"`
}

// TaskSequences returns taskID's sequences that hold a job, in every
// queue.
func (p *Producer) TaskSequences(ctx context.Context, taskID string) ([]TaskSequence, error) {
	queues, err := p.insp.Queues()
	if err != nil {
		return nil, fmt.Errorf("jobs: list queues: %w", err)
	}
	var out []TaskSequence
	for _, q := range queues {
		seq := p.store.sequence(q, taskID)
		head, err := p.rdb.HGet(ctx, seq.key(), "head").Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("jobs: read the sequence of task %q: %w", taskID, err)
		}
		n, err := p.rdb.LLen(ctx, seq.waitKey()).Result()
		if err != nil {
			return nil, fmt.Errorf("jobs: read the sequence of task %q: %w", taskID, err)
		}
		if head != "" || n > 0 {
			out = append(out, TaskSequence{Queue: q, Head: head, Waiting: n})
		}
	}
	return out, nil
}
