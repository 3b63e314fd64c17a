package jobs

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

// Waking idle workers.
//
// asynq v0.26 has no blocking dequeue: an idle worker runs its dequeue
// script once per queue, finds nothing, sleeps TaskCheckInterval, and
// again. That makes pickup latency and idle Redis load one trade-off
// (docs/PERFORMANCE.md): 5 ms between polls meant ≈ 3 ms of pickup and
// ≈ 500 commands/s per idle worker.
//
// A worker therefore gives asynq a Redis client of its own, with a hook
// (waker) that watches asynq's dequeue calls. When one round of them has
// found every queue the worker serves empty, the hook holds the last call
// until a wake-up arrives for one of those queues, or until the worker's
// TaskCheckInterval has passed, and only then lets asynq see "empty".
// asynq then sleeps a short wakePause and dequeues again, finding the job
// whose wake-up ended the wait. Everything that makes a job runnable
// publishes a wake-up on the queue's channel (wakeChannel) after the job
// is in its pending list:
//
//   - Producer.Enqueue, for a job enqueued runnable, and Producer's
//     terminate;
//   - the sequence scripts' promote (sequence.go): a task's next job when
//     its turn comes, a late head, a job given its result while it waited;
//   - asynq's forwarder (retries, capacity waits, delayed jobs falling
//     due), seen by the same hook: a forward that moved jobs publishes;
//   - asynq's requeue (a stopping worker hands back the jobs still
//     running after ShutdownTimeout), seen by the same hook;
//   - Producer.Cancel, when it brings a delayed or retrying job forward
//     (asynq's RunTask) for a worker to end it.
//
// What publishes nothing (asynqmon's "run now", a job enqueued by a plain
// asynq client, a wake-up lost while the subscription reconnects) is
// picked up by the next poll, TaskCheckInterval after the last. Nothing
// is ever held longer than that: the hook only delays asynq's "empty".
//
// The hook recognises asynq's scripts by their keys (asynq:{Q}:pending,
// :paused, :active, :lease for a dequeue; a scheduled or retry set and
// :pending for a forward; :active, :lease, :pending and the task's hash
// for a requeue). An asynq whose scripts change shape is not
// recognised: the worker then polls every wakePause, which the idle-load
// test (TestIdleWorkerIsQuiet) catches.

// wakePause is asynq's TaskCheckInterval while wake-ups work: the pause
// after the hook lets an empty round through (asynq sleeps 0.5 to 1.5 of
// it). Short, since the hook's wait, not asynq's sleep, is what keeps an
// idle worker quiet.
const wakePause = 500 * time.Microsecond

// wakeChannel is the pub/sub channel of queue's wake-ups: in the queue's
// hash slot like boxq's other keys of it (a channel is no key, but a
// sharded deployment may want them together).
func wakeChannel(prefix, queue string) string {
	return prefix + "{" + queue + "}:wake"
}

// wakeLua defines WAKE, the wake-up channel of the queue whose sequence
// keys the script has, from the late-heads set's name (seqLateKey): the
// same string as wakeChannel. It needs LATE.
const wakeLua = `
local WAKE = string.sub(LATE, 1, #LATE - #'seqlate') .. 'wake'
`

// wake publishes a wake-up for queue. Best effort: a lost one costs an
// idle worker's pickup TaskCheckInterval at most.
func wake(ctx context.Context, rdb redis.UniversalClient, prefix, queue string) {
	// Not the caller's context: the job is runnable already, and a caller
	// gone just now (an API client that hung up) must not cost its
	// wake-up.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	_ = rdb.Publish(ctx, wakeChannel(prefix, queue), "").Err()
}

// enqueueAndWake enqueues task through c and, when asynq made it runnable
// at once (pending, not scheduled or parked), wakes its queue's idle
// workers: every enqueue of boxq's goes through it.
func enqueueAndWake(ctx context.Context, c *asynq.Client, rdb redis.UniversalClient, prefix string, task *asynq.Task, opts ...asynq.Option) (*asynq.TaskInfo, error) {
	info, err := c.EnqueueContext(ctx, task, opts...)
	if err == nil && info.State == asynq.TaskStatePending {
		wake(ctx, rdb, prefix, info.Queue)
	}
	return info, err
}

// waker is the hook on asynq's own Redis client; see above.
type waker struct {
	rdb    redis.UniversalClient // the client it is a hook of, to publish
	prefix string                // boxq's key prefix
	// served maps asynq's key prefix of each served queue ("asynq:{Q}:")
	// to the queue's name.
	served map[string]string
	idle   time.Duration // the longest wait: TaskCheckInterval
	woken  chan struct{} // one wake-up kept, not counted
	stop   <-chan struct{}

	mu    sync.Mutex
	empty map[string]bool // queues found empty in the current round

	waits atomic.Int64 // waits begun: the idle rounds, for tests
	woke  atomic.Int64 // rounds let through by a wake-up, for tests
	// lastWoken is when a wake-up last let a round through (wakeGap).
	// Only the processor's goroutine, which runs the dequeues, reads and
	// writes it.
	lastWoken time.Time
}

func newWaker(rdb redis.UniversalClient, prefix string, queues []string, idle time.Duration, stop <-chan struct{}) *waker {
	w := &waker{rdb: rdb, prefix: prefix, served: make(map[string]string, len(queues)), idle: idle,
		woken: make(chan struct{}, 1), stop: stop, empty: map[string]bool{}}
	for _, q := range queues {
		w.served["asynq:{"+q+"}:"] = q
	}
	return w
}

// notify records a wake-up. One is enough: whatever arrives while one is
// kept lets the same next round through.
func (w *waker) notify() {
	select {
	case w.woken <- struct{}{}:
	default:
	}
}

// listen follows the wake-up channels of the served queues until ctx
// ends. go-redis subscribes again by itself after a lost connection.
func (w *waker) listen(ctx context.Context, sub redis.UniversalClient) {
	channels := make([]string, 0, len(w.served))
	for _, q := range w.served {
		channels = append(channels, wakeChannel(w.prefix, q))
	}
	ps := sub.Subscribe(ctx, channels...)
	defer ps.Close()
	// Once subscribed, one free round: a job made runnable before the
	// subscription held published to no one.
	for range channels {
		if _, err := ps.Receive(ctx); err != nil {
			break // ctx ended, or Redis is away: Channel's reconnects take over
		}
	}
	w.notify()
	msgs := ps.Channel()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-msgs:
			if !ok {
				return
			}
			w.notify()
		}
	}
}

func (w *waker) DialHook(next redis.DialHook) redis.DialHook { return next }

func (w *waker) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (w *waker) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		switch kind, queue := w.classify(cmd); kind {
		case asynqDequeue:
			w.dequeued(queue, err)
		case asynqForward:
			if c, ok := cmd.(*redis.Cmd); ok && err == nil && c.Val() != int64(0) {
				// Jobs became runnable: wake every idle worker of the
				// queue, this one included (it hears its own publish).
				wake(context.WithoutCancel(ctx), w.rdb, w.prefix, queue)
			}
		case asynqRequeue:
			if err == nil {
				// A stopping worker handed a running job back: another
				// worker takes it (and re-attaches to its exec) now.
				wake(context.WithoutCancel(ctx), w.rdb, w.prefix, queue)
			}
		}
		return err
	}
}

// dequeued follows one dequeue call of asynq's round over the queues: a
// round that found all of them empty waits for a wake-up before asynq
// sees its end.
func (w *waker) dequeued(queue string, err error) {
	w.mu.Lock()
	if !errors.Is(err, redis.Nil) {
		// A job, or an error: the round ends here, and the next one
		// starts over.
		clear(w.empty)
		w.mu.Unlock()
		return
	}
	w.empty[queue] = true
	all := len(w.empty) == len(w.served)
	if all {
		clear(w.empty)
	}
	w.mu.Unlock()
	if all {
		w.wait()
	}
}

// wakeGap is the least time between two rounds that wake-ups let
// through. Every idle worker hears every wake-up of its queues: without a
// gap, a fleet fed thousands of jobs a second would run a round per job
// per worker. With it, a worker runs at most one round per wakeGap, as
// much as asynq's own 5 ms polling cost, while a wake-up that comes after
// a quiet spell (one job, a task's next command) is let through at once.
// A wake-up inside the gap is kept, not lost: it lets the round through
// at the gap's end.
const wakeGap = 5 * time.Millisecond

// wait holds an empty round until a wake-up, the worker's stop, or the
// longest wait.
func (w *waker) wait() {
	woken := false
	select {
	case <-w.woken: // arrived during the round: its job may be there now
		woken = true
	case <-w.stop:
		return
	default:
		w.waits.Add(1)
		t := time.NewTimer(w.idle)
		defer t.Stop()
		select {
		case <-w.woken:
			woken = true
		case <-w.stop:
			return
		case <-t.C:
		}
	}
	if !woken {
		return
	}
	if d := wakeGap - time.Since(w.lastWoken); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-w.stop:
			return
		}
	}
	w.lastWoken = time.Now()
	w.woke.Add(1)
}

type asynqCall int

const (
	otherCall asynqCall = iota
	asynqDequeue
	asynqForward
	asynqRequeue
)

// classify tells asynq's dequeue, forward and requeue scripts (by their keys) from
// every other command, and names the served queue they are about.
func (w *waker) classify(cmd redis.Cmder) (asynqCall, string) {
	args := cmd.Args()
	if len(args) < 3 {
		return otherCall, ""
	}
	name, _ := args[0].(string)
	if !strings.EqualFold(name, "evalsha") && !strings.EqualFold(name, "eval") {
		return otherCall, ""
	}
	keys := make([]string, 0, 4)
	for _, a := range args[3:] {
		s, ok := a.(string)
		if !ok || len(keys) == 4 {
			break
		}
		keys = append(keys, s)
	}
	switch numKeys(args[2]) {
	case 4:
		if len(keys) == 4 {
			p, ok := w.queuePrefix(keys[0], "pending")
			if ok && keys[1] == p+"paused" && keys[2] == p+"active" && keys[3] == p+"lease" {
				return asynqDequeue, w.served[p]
			}
			p, ok = w.queuePrefix(keys[2], "pending")
			if ok && keys[0] == p+"active" && keys[1] == p+"lease" && strings.HasPrefix(keys[3], p+"t:") {
				return asynqRequeue, w.served[p]
			}
		}
	case 2:
		if len(keys) >= 2 {
			p, ok := w.queuePrefix(keys[1], "pending")
			if ok && (keys[0] == p+"scheduled" || keys[0] == p+"retry") {
				return asynqForward, w.served[p]
			}
		}
	}
	return otherCall, ""
}

// queuePrefix returns key's asynq queue prefix ("asynq:{Q}:") if key is
// that prefix followed by suffix, for a served queue.
func (w *waker) queuePrefix(key, suffix string) (string, bool) {
	p, ok := strings.CutSuffix(key, suffix)
	if !ok {
		return "", false
	}
	_, served := w.served[p]
	return p, served
}

func numKeys(a any) int {
	switch n := a.(type) {
	case int:
		return n
	case int64:
		return int(n)
	case string:
		switch n {
		case "2":
			return 2
		case "4":
			return 4
		}
	}
	return -1
}

// ownClient returns a new client with rdb's options, for asynq alone, so
// that the waker's hook sees only this worker's asynq calls; false for a
// client it cannot copy faithfully:
//   - a Sentinel failover client (a *redis.Client whose Addr is
//     "FailoverClient"): a copy would dial the new master, but the pooled
//     connections to the old one are closed on a failover only in the
//     original's pool;
//   - a Ring: its Subscribe puts every channel on the first channel's
//     shard, while each wake-up is published on its own channel's shard;
//   - anything that is not a go-redis client.
func ownClient(rdb redis.UniversalClient) (redis.UniversalClient, bool) {
	switch c := rdb.(type) {
	case *redis.Client:
		if c.Options().Addr == "FailoverClient" {
			return nil, false
		}
		// A push processor of its own: the original's holds the
		// original's MOVING handler, and go-redis refuses a second one
		// (it panics where maintenance notifications are required).
		opt := *c.Options()
		opt.PushNotificationProcessor = nil
		return redis.NewClient(&opt), true
	case *redis.ClusterClient:
		return redis.NewClusterClient(c.Options()), true
	}
	return nil, false
}
