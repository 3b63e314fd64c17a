package jobs

import (
	"testing"
	"time"
)

func TestCancelWatch(t *testing.T) {
	var none *cancelWatch
	if none.requested("j", 0) {
		t.Error("a nil watch heard a cancel")
	}

	c := newCancelWatch()
	if c.requested("j1", 0) {
		t.Error("j1: a cancel nobody sent")
	}

	// Heard before the job's context ended.
	c.note("j1", time.Now())
	if !c.requested("j1", 0) {
		t.Error("j1: a cancel heard earlier was forgotten")
	}

	// Heard while the job waits for it.
	got := make(chan bool)
	go func() { got <- c.requested("j2", time.Minute) }()
	for {
		c.mu.Lock()
		n := len(c.waiting["j2"])
		c.mu.Unlock()
		if n == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	c.note("j2", time.Now())
	if !<-got {
		t.Error("j2: the cancel that arrived while waiting was missed")
	}

	// Not heard: the wait ends, and leaves nothing behind.
	if c.requested("j3", 10*time.Millisecond) {
		t.Error("j3: a cancel nobody sent")
	}
	if len(c.waiting) != 0 {
		t.Errorf("waiters left behind: %v", c.waiting)
	}

	// A cancel heard long ago no longer counts.
	c.note("j5", time.Now().Add(-2*heardFor))
	if c.requested("j5", 0) {
		t.Error("j5: a cancel older than heardFor still counts")
	}

	// Old cancels are dropped when new ones arrive.
	c.note("j4", time.Now().Add(2*heardFor))
	if _, ok := c.heard["j1"]; ok {
		t.Error("j1's cancel was kept past heardFor")
	}
}
