package jobs_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/jobs"
)

// TestHubHearsAnyProducersJobs: a Hub hears the result of a job that
// another producer enqueued without any notify channel, by the queue's
// done channel alone (its sweep is set to an hour, so only the
// notification can deliver it); two watches of one job both get it; a job
// that ended before it was added is found by Check.
func TestHubHearsAnyProducersJobs(t *testing.T) {
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

	j := jobs.Job{ID: "hub-" + randID(), TaskID: "t-hub", Command: "echo heard"}
	e := jobs.Enqueued{ID: j.ID, Queue: j.QueueName()}
	w1, w2 := hub.Watch(), hub.Watch()
	defer w1.Close()
	defer w2.Close()
	w1.Add(e)
	w2.Add(e)
	if _, err := s.prod.Enqueue(ctx, j, ""); err != nil {
		t.Fatal(err)
	}
	s.startWorker(t, nil)
	for i, w := range []*jobs.Watch{w1, w2} {
		r, err := w.Next(ctx)
		if err != nil {
			t.Fatalf("watch %d: %v", i+1, err)
		}
		if r.ID != j.ID || r.Status != jobs.StatusCompleted || r.Output != "heard\n" {
			t.Errorf("watch %d: got %+v; want job %s completed with its output", i+1, r, j.ID)
		}
		if w.Pending() != 0 {
			t.Errorf("watch %d: %d pending after its only job", i+1, w.Pending())
		}
	}

	late := hub.Watch()
	defer late.Close()
	late.Add(e)
	late.Check(e.ID)
	if r, err := late.Next(ctx); err != nil || r.ID != j.ID {
		t.Errorf("a watch added after the job ended: %+v, %v; want its result", r, err)
	}
}

// TestHubSweepFindsUnpublishedResults: a job cancelled while it waits for
// its turn gets its result written without a notification; the hub's
// sweep finds it. A job deleted without a result gets an error result.
func TestHubSweepFindsUnpublishedResults(t *testing.T) {
	s := newStack(t, stackOptions{}) // producer sweep: 200 ms
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	hub, err := s.prod.NewHub(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hub.Close()
	w := hub.Watch()
	defer w.Close()

	head := jobs.Job{ID: "head-" + randID(), TaskID: "t-sweep", Command: "true"}
	behind := jobs.Job{ID: "behind-" + randID(), TaskID: "t-sweep", Command: "true"}
	gone := jobs.Job{ID: "gone-" + randID(), TaskID: "t-gone", Command: "true"}
	for _, j := range []jobs.Job{head, behind, gone} {
		e, err := s.prod.Enqueue(ctx, j, "")
		if err != nil {
			t.Fatal(err)
		}
		if j.ID != head.ID {
			w.Add(e)
		}
	}
	if err := s.prod.Cancel(ctx, behind.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.rdb.Del(ctx, jobs.TaskKey(jobs.DefaultQueue, gone.ID)).Err(); err != nil {
		t.Fatal(err)
	}
	got := map[string]jobs.Result{}
	for w.Pending() > 0 {
		r, err := w.Next(ctx)
		if err != nil {
			t.Fatalf("Next (%d in): %v", len(got), err)
		}
		got[r.ID] = r
	}
	if r := got[behind.ID]; r.Status != jobs.StatusCancelled || r.ReturnCode != 130 {
		t.Errorf("cancelled waiting job: %+v; want cancelled, rc 130", r)
	}
	if r := got[gone.ID]; r.Status != jobs.StatusError {
		t.Errorf("deleted job: %+v; want an error result", r)
	}
}

// TestWatchReadsEachResultOnce: a watch whose jobs have all ended (a
// batch's results, arriving while its requests were still enqueued) returns
// each result once and reads each from Redis about once, however many are
// looked up at a time.
func TestWatchReadsEachResultOnce(t *testing.T) {
	const n = 300 // more than a lookup batch
	s := newStack(t, stackOptions{})
	s.startWorker(t, nil)
	var js []jobs.Job
	for i := range n {
		js = append(js, jobs.Job{ID: fmt.Sprintf("once-%d-%s", i, randID()), TaskID: fmt.Sprintf("t-once-%d", i%30), Command: "true"})
	}
	s.runJobs(t, 2*time.Minute, js...)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	hub, err := s.prod.NewHub(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hub.Close()
	w := hub.Watch()
	defer w.Close()
	for _, j := range js {
		w.Add(jobs.Enqueued{ID: j.ID, Queue: jobs.DefaultQueue})
		w.Check(j.ID)
	}
	hmgets := func() int {
		stats, err := s.rdb.Info(ctx, "commandstats").Result()
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.Lines(stats) {
			if rest, ok := strings.CutPrefix(line, "cmdstat_hmget:calls="); ok {
				k, _ := strconv.Atoi(strings.SplitN(rest, ",", 2)[0])
				return k
			}
		}
		return 0
	}
	before := hmgets()
	seen := map[string]bool{}
	for w.Pending() > 0 {
		r, err := w.Next(ctx)
		if err != nil {
			t.Fatalf("Next (%d in): %v", len(seen), err)
		}
		if seen[r.ID] {
			t.Fatalf("job %s returned twice", r.ID)
		}
		seen[r.ID] = true
	}
	if len(seen) != n {
		t.Errorf("%d results; want %d", len(seen), n)
	}
	if reads := hmgets() - before; reads > 2*n {
		t.Errorf("%d result reads for %d results; want about one each", reads, n)
	}
}
