package jobs

import (
	"context"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// asynqCancelChannel is where asynq's CancelProcessing publishes the id of
// a job to cancel (base.CancelChannel at the pinned version; guarded by
// TestCancelFromDashboard).
const asynqCancelChannel = "asynq:cancel"

// cancelWatch follows asynq's cancel channel, so that a worker can tell a
// job's context ended by CancelProcessing (the dashboard's Cancel button,
// or any asynq client) from one ended because asynq lost the job's lease:
// asynq cancels the context alike in both cases, and only the first should
// kill the command.
//
// asynq's own subscriber and this one hear a cancel at about the same
// time, in either order: a cancel heard first is kept for a while, and a
// context that ends first waits a moment for it (requested).
type cancelWatch struct {
	mu      sync.Mutex
	heard   map[string]time.Time       // job id → when its cancel arrived
	waiting map[string][]chan struct{} // job id → requested calls waiting for it
}

// heardFor is how long a cancel heard is kept for a context that has not
// ended yet.
const heardFor = time.Minute

func newCancelWatch() *cancelWatch {
	return &cancelWatch{heard: map[string]time.Time{}, waiting: map[string][]chan struct{}{}}
}

// run listens on ps, a subscription to asynqCancelChannel, until ctx ends,
// and closes it. go-redis re-subscribes on its own after a lost connection.
func (c *cancelWatch) run(ctx context.Context, ps *redis.PubSub) {
	defer ps.Close()
	msgs := ps.Channel()
	for {
		select {
		case <-ctx.Done():
			return
		case m, ok := <-msgs:
			if !ok {
				return
			}
			c.note(m.Payload, time.Now())
		}
	}
}

func (c *cancelWatch) note(jobID string, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, at := range c.heard {
		if now.Sub(at) > heardFor {
			delete(c.heard, id)
		}
	}
	c.heard[jobID] = now
	for _, ch := range c.waiting[jobID] {
		close(ch)
	}
	delete(c.waiting, jobID)
}

// requested reports whether a cancel of jobID has been heard, waiting up to
// wait for one to arrive.
func (c *cancelWatch) requested(jobID string, wait time.Duration) bool {
	if c == nil {
		return false
	}
	c.mu.Lock()
	if at, ok := c.heard[jobID]; ok && time.Since(at) <= heardFor {
		c.mu.Unlock()
		return true
	}
	ch := make(chan struct{})
	c.waiting[jobID] = append(c.waiting[jobID], ch)
	c.mu.Unlock()

	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	chans := c.waiting[jobID]
	for i, w := range chans {
		if w == ch {
			chans = append(chans[:i], chans[i+1:]...)
			break
		}
	}
	if len(chans) == 0 {
		delete(c.waiting, jobID)
	} else {
		c.waiting[jobID] = chans
	}
	at, ok := c.heard[jobID]
	return ok && time.Since(at) <= heardFor
}
