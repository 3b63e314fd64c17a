package jobs_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/boxq/boxq/jobs"
)

// TestHubWatchHearsResultDuringLookup: a job's notification that arrives
// while a watch is reading that job (Check found it not ended yet) is not
// lost: the watch reads it again and returns its result. The hub's sweep
// is an hour, so only the notification can deliver it; on the old code
// the watch waited until its context ended.
func TestHubWatchHearsResultDuringLookup(t *testing.T) {
	s := newStack(t, stackOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	listener, err := jobs.NewProducer(s.rdb, jobs.ProducerConfig{Sweep: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	hub, err := listener.NewHub(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hub.Close()

	j := jobs.Job{ID: "race-" + randID(), TaskID: "t-race", Command: "echo late"}
	e := jobs.Enqueued{ID: j.ID, Queue: j.QueueName()}
	if _, err := s.prod.Enqueue(ctx, j, ""); err != nil {
		t.Fatal(err)
	}
	w, witness := hub.Watch(), hub.Watch()
	defer w.Close()
	defer witness.Close()
	w.Add(e)       // notified first
	witness.Add(e) // then this one, in the same notification
	var once sync.Once
	jobs.SetHubAfterLookup(hub, func() {
		once.Do(func() {
			// The lookup saw the job pending. Now it runs, and its
			// notification reaches the hub before the lookup ends.
			s.startWorker(t, nil)
			for !witness.Ready() {
				select {
				case <-ctx.Done():
					t.Fatal("no notification for the job")
				case <-time.After(10 * time.Millisecond): // waiting for the worker
				}
			}
		})
	})
	w.Check(e.ID)
	nctx, ncancel := context.WithTimeout(ctx, 20*time.Second)
	defer ncancel()
	r, err := w.Next(nctx)
	if err != nil || r.ID != j.ID || r.Status != jobs.StatusCompleted {
		t.Fatalf("Next: %+v, %v; want job %s completed (its notification came during the lookup)", r, err, j.ID)
	}
}
