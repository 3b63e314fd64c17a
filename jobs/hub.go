package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Hub serves any number of waits for results through one pub/sub
// connection, for a long-running process (the HTTP API) where many clients
// wait at once, for jobs that anyone enqueued. It listens on every queue's
// done channel (resultScript publishes each job's id there as its result
// is written), and a sweep every ProducerConfig.Sweep looks up the jobs
// still awaited, in one pipelined round trip per queue, so that a lost
// notification (a Redis restart) or a result written without one (a
// waiting job cancelled out of its sequence) delays an answer but never
// loses it. A thousand waits cost one connection and one sweep, not a
// thousand.
//
// A Waiter, by contrast, belongs to one producer's batch and hears only
// the jobs enqueued with its channel.
type Hub struct {
	p    *Producer
	ps   *redis.PubSub
	quit chan struct{}
	done chan struct{}

	// afterLookup is a fault point for tests (SetHubAfterLookup).
	afterLookup func()

	mu sync.Mutex
	// byID lists the watches that wait for each job id: mostly one, so a
	// slice, not a set (a batch of 100,000 jobs holds 100,000 of them).
	byID map[string][]*Watch
}

// NewHub subscribes to the done channels of every queue and returns a Hub
// serving waits until Close.
func (p *Producer) NewHub(ctx context.Context) (*Hub, error) {
	ps := p.rdb.PSubscribe(ctx, doneChannel(p.cfg.Prefix, "*"))
	// Wait for the subscription, or a result written right after a wait
	// began could be missed (until the next sweep).
	if _, err := ps.Receive(ctx); err != nil {
		ps.Close()
		return nil, fmt.Errorf("jobs: subscribe for results: %w", err)
	}
	h := &Hub{p: p, ps: ps, quit: make(chan struct{}), done: make(chan struct{}),
		byID: make(map[string][]*Watch)}
	go h.run()
	return h, nil
}

// Close stops listening. Watches still open get no more notifications.
func (h *Hub) Close() error {
	close(h.quit)
	err := h.ps.Close()
	<-h.done
	return err
}

func (h *Hub) run() {
	defer close(h.done)
	msgs := h.ps.Channel(redis.WithChannelSize(4096))
	prefix := doneChannel(h.p.cfg.Prefix, "")
	sweep := time.NewTimer(h.p.cfg.Sweep)
	defer sweep.Stop()
	for {
		select {
		case <-h.quit:
			return
		case m, ok := <-msgs:
			if !ok {
				return
			}
			h.notify(strings.TrimPrefix(m.Channel, prefix), m.Payload)
		case <-sweep.C:
			n, err := h.sweep()
			if err != nil {
				h.p.cfg.Logger.Warn("cannot look awaited results up; retrying", "err", err)
			}
			// Spaced out as the jobs awaited grow, like a Waiter's sweep:
			// about 2,000 jobs looked up per second at most.
			sweep.Reset(max(h.p.cfg.Sweep, time.Duration(n/2000)*time.Second))
		}
	}
}

// notify tells the watches of job id (of queue) that it may have ended.
func (h *Hub) notify(queue, id string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, w := range h.byID[id] {
		w.ended(queue, id)
	}
}

// sweep looks up every awaited job that no notification has marked yet,
// and marks those that ended (a result, gone, or archived). It returns how
// many it looked up.
func (h *Hub) sweep() (int, error) {
	byQueue := map[string][]string{}
	n := 0
	h.mu.Lock()
	for id, ws := range h.byID {
		for _, w := range ws {
			if q, ok := w.unmarked(id); ok {
				byQueue[q] = append(byQueue[q], id)
				n++
				break
			}
		}
	}
	h.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var errs error
	for queue, ids := range byQueue {
		states, err := h.p.store.ended(ctx, queue, ids)
		if err != nil {
			errs = errors.Join(errs, err)
			continue
		}
		for i, ended := range states {
			if ended {
				h.notify(queue, ids[i])
			}
		}
	}
	return n, errs
}

// Awaited returns how many jobs the hub's watches wait for.
func (h *Hub) Awaited() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.byID)
}

func (h *Hub) register(w *Watch, id string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !slices.Contains(h.byID[id], w) {
		h.byID[id] = append(h.byID[id], w)
	}
}

func (h *Hub) unregister(w *Watch, ids ...string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, id := range ids {
		ws := slices.DeleteFunc(h.byID[id], func(o *Watch) bool { return o == w })
		if len(ws) == 0 {
			delete(h.byID, id)
		} else {
			h.byID[id] = ws
		}
	}
}

// Watch is one wait for the results of some jobs, served by a Hub. Add the
// jobs (before enqueueing them, or call Check after: a job that ended
// before its Add is otherwise found by the next sweep), then call Next
// until Pending is 0. A Watch holds the ids it waits for and the result
// it is about to return, never a backlog of results: a consumer that reads
// slowly leaves the results in Redis.
type Watch struct {
	h    *Hub
	wake chan struct{} // a job ended (capacity 1)

	mu       sync.Mutex
	pending  map[string]watched // by value: one allocation less per job
	ready    []Result           // looked up, to return (at most lookupBatch)
	endedIDs []string           // ids marked ended, to look up
	closed   bool
}

type watched struct {
	queue      string
	marked     bool      // in endedIDs, or being looked up
	again      bool      // notified while being looked up: look it up again
	archivedAt time.Time // when first seen archived without a result
}

// Watch returns an empty Watch. Close it when done.
func (h *Hub) Watch() *Watch {
	return &Watch{h: h, wake: make(chan struct{}, 1), pending: make(map[string]watched)}
}

// Add waits for job e too.
func (w *Watch) Add(e Enqueued) {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	if _, ok := w.pending[e.ID]; !ok {
		w.pending[e.ID] = watched{queue: e.Queue}
	}
	w.mu.Unlock()
	w.h.register(w, e.ID)
}

// Check makes the next Next look job id up at once: for a job added after
// it may have ended.
func (w *Watch) Check(id string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if pj, ok := w.pending[id]; ok {
		w.markLocked(pj.queue, id)
	}
}

// ended marks job id of queue as ended. Locks: the hub's, then a
// watch's, never the other way round.
func (w *Watch) ended(queue, id string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.markLocked(queue, id)
}

func (w *Watch) markLocked(queue, id string) {
	pj, ok := w.pending[id]
	if !ok || pj.queue != queue {
		return
	}
	if pj.marked {
		// A lookup of it may be under way and may have read it before
		// this end: it must not send it back to waiting.
		if !pj.again {
			pj.again = true
			w.pending[id] = pj
		}
		return
	}
	pj.marked = true
	w.pending[id] = pj
	w.endedIDs = append(w.endedIDs, id)
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// unmarked returns job id's queue when w waits for it and no notification
// has marked it.
func (w *Watch) unmarked(id string) (string, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	pj, ok := w.pending[id]
	if !ok || pj.marked {
		return "", false
	}
	return pj.queue, true
}

// Remove stops waiting for job id (one that could not be enqueued).
func (w *Watch) Remove(id string) {
	w.mu.Lock()
	delete(w.pending, id)
	w.mu.Unlock()
	w.h.unregister(w, id)
}

// Ready reports whether a job has ended that Next has not returned yet:
// Next will not wait for it.
func (w *Watch) Ready() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.ready) > 0 || len(w.endedIDs) > 0
}

// Pending returns how many jobs have not been returned by Next yet.
func (w *Watch) Pending() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.pending) + len(w.ready)
}

// lookupBatch bounds how many ended jobs one Next looks up at once.
const lookupBatch = 256

// Next returns the result of the next job to end. A job that no longer
// exists, or that asynq archived without a result, gets an "error"
// result. It returns an error when ctx ends, when no job is left to wait
// for, or when Redis fails.
func (w *Watch) Next(ctx context.Context) (Result, error) {
	for {
		w.mu.Lock()
		if len(w.ready) > 0 {
			r := w.ready[0]
			w.ready[0] = Result{}
			w.ready = w.ready[1:]
			w.mu.Unlock()
			return r, nil
		}
		if len(w.pending) == 0 {
			w.mu.Unlock()
			return Result{}, errors.New("jobs: no job to wait for")
		}
		n := min(len(w.endedIDs), lookupBatch)
		batch := w.endedIDs[:n:n]
		w.endedIDs = w.endedIDs[n:]
		w.mu.Unlock()
		if len(batch) > 0 {
			if err := w.lookUp(ctx, batch); err != nil {
				return Result{}, err
			}
			continue
		}
		select {
		case <-ctx.Done():
			return Result{}, ctx.Err()
		case <-w.wake:
		}
	}
}

// lookUp reads the jobs of batch (at most lookupBatch): the results found
// go to w.ready, to be returned by the next calls to Next (so a Watch holds
// at most a batch of results), the jobs that have not ended after all back
// to waiting. On an error the batch goes back to be looked up again.
func (w *Watch) lookUp(ctx context.Context, batch []string) error {
	w.mu.Lock()
	byQueue := map[string][]string{}
	for _, id := range batch {
		if pj, ok := w.pending[id]; ok {
			byQueue[pj.queue] = append(byQueue[pj.queue], id)
			pj.again = false // a notification from now on counts
			w.pending[id] = pj
		}
	}
	w.mu.Unlock()
	var (
		found []Result
		wait  []string // not ended after all
		back  []string // not looked up (an error)
		errs  error
	)
	for queue, ids := range byQueue {
		states, err := w.h.p.store.lookup(ctx, queue, ids)
		if err != nil {
			errs = errors.Join(errs, err)
			back = append(back, ids...)
			continue
		}
		for i, st := range states {
			if r, ok := w.resultOf(queue, ids[i], st); ok {
				found = append(found, r)
			} else {
				wait = append(wait, ids[i])
			}
		}
	}
	if w.h.afterLookup != nil {
		w.h.afterLookup()
	}
	done := make([]string, 0, len(found))
	w.mu.Lock()
	for _, id := range wait {
		pj, ok := w.pending[id]
		switch {
		case !ok:
		case pj.again:
			// Notified during the lookup: it may have ended after it
			// was read. Look it up again rather than miss the end.
			pj.again = false
			w.pending[id] = pj
			w.endedIDs = append(w.endedIDs, id)
		default:
			pj.marked = false
			w.pending[id] = pj
		}
	}
	for _, r := range found {
		if _, ok := w.pending[r.ID]; ok {
			delete(w.pending, r.ID)
			w.ready = append(w.ready, r)
			done = append(done, r.ID)
		}
	}
	w.endedIDs = append(w.endedIDs, back...)
	w.mu.Unlock()
	w.h.unregister(w, done...)
	if errs != nil && ctx.Err() == nil {
		return errs
	}
	return ctx.Err()
}

// resultOf turns a looked-up job into its result: ok is false while it
// has none and may still get one.
func (w *Watch) resultOf(queue, id string, st taskState) (Result, bool) {
	switch {
	case st.result != nil:
		var r Result
		if err := json.Unmarshal(st.result, &r); err != nil {
			r = Result{ID: id, Status: StatusError, ReturnCode: 1, Error: "unreadable result: " + err.Error()}
		}
		return r, true
	case !st.exists:
		return Result{ID: id, Status: StatusError, ReturnCode: 1,
			Error: "job no longer exists and left no result (deleted, or its result expired)"}, true
	case st.state == "archived":
		w.mu.Lock()
		pj, ok := w.pending[id]
		if ok && pj.archivedAt.IsZero() {
			pj.archivedAt = time.Now()
			w.pending[id] = pj
		}
		young := ok && time.Since(pj.archivedAt) < archivedGrace
		w.mu.Unlock()
		if young {
			// asynq archives a job whose deadline passed without waiting
			// for its handler, which may still be writing its result.
			return Result{}, false
		}
		msg := "job failed without a result"
		if info, err := w.h.p.insp.GetTaskInfo(queue, id); err == nil && info.LastErr != "" {
			msg += ": " + info.LastErr
		}
		return Result{ID: id, Status: StatusError, ReturnCode: 1, Error: msg}, true
	}
	return Result{}, false
}

// Close ends the wait.
func (w *Watch) Close() {
	w.mu.Lock()
	ids := make([]string, 0, len(w.pending))
	for id := range w.pending {
		ids = append(ids, id)
	}
	w.pending = map[string]watched{}
	w.ready = nil
	w.closed = true
	w.mu.Unlock()
	w.h.unregister(w, ids...)
}

// ended reports, for each job of ids, whether it has ended: it has a
// result, no longer exists, or was archived. Unlike lookup it does not
// read the results.
func (s store) ended(ctx context.Context, queue string, ids []string) ([]bool, error) {
	// In slices: a pipeline of 100,000 lookups would hold 200,000 commands
	// and their replies at once.
	out := make([]bool, 0, len(ids))
	for chunk := range slices.Chunk(ids, 1000) {
		e, err := s.endedChunk(ctx, queue, chunk)
		if err != nil {
			return nil, err
		}
		out = append(out, e...)
	}
	return out, nil
}

func (s store) endedChunk(ctx context.Context, queue string, ids []string) ([]bool, error) {
	pipe := s.rdb.Pipeline()
	states := make([]*redis.StringCmd, len(ids))
	results := make([]*redis.BoolCmd, len(ids))
	for i, id := range ids {
		states[i] = pipe.HGet(ctx, taskKey(queue, id), "state")
		results[i] = pipe.HExists(ctx, taskKey(queue, id), "result")
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("jobs: look up %d jobs: %w", len(ids), err)
	}
	out := make([]bool, len(ids))
	for i := range ids {
		st, err := states[i].Result()
		out[i] = errors.Is(err, redis.Nil) || st == "archived" || results[i].Val()
	}
	return out, nil
}
