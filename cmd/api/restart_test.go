package main

import (
	"context"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
)

// TestAPIHubResubscribesAfterRedisRestart: after Redis restarts, the API's
// one subscriber subscribes again, and a wait hears a job's result by its
// notification alone (the hub's sweep is set to an hour).
func TestAPIHubResubscribesAfterRedisRestart(t *testing.T) {
	srv := redistest.StartServer(t)
	if srv.Embedded() {
		t.Skip("needs redis-server: the embedded Redis has no restart with live connections")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rdb, err := connectRedis(ctx, srv.URL(0))
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	s, err := newServer(ctx, rdb, jobs.ProducerConfig{Sweep: time.Hour}, "", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer s.hub.Close()

	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	// The subscriber is back once Redis counts its pattern again.
	for {
		n, err := rdb.PubSubNumPat(ctx).Result()
		if err == nil && n == 1 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the hub did not subscribe again after the restart (numpat %d, %v)", n, err)
		case <-time.After(20 * time.Millisecond): // waiting for go-redis to reconnect
		}
	}

	gw, err := local.New(local.Config{Token: gwToken, Isolation: local.IsolationNone})
	if err != nil {
		t.Fatal(err)
	}
	gwSrv := httptest.NewServer(gw.Handler())
	t.Cleanup(func() { // after the worker's own cleanup
		gwSrv.Close()
		_ = gw.Close(context.Background())
	})
	st := &apiStack{rdb: rdb, redisURL: srv.URL(0), gwURL: gwSrv.URL, api: s}
	st.startWorker(t)

	j := jobs.Job{ID: "restart-1", TaskID: "t-restart", Command: "echo back"}
	w := s.hub.Watch()
	defer w.Close()
	w.Add(jobs.Enqueued{ID: j.ID, Queue: j.QueueName()})
	if _, err := s.prod.Enqueue(ctx, j, ""); err != nil {
		t.Fatal(err)
	}
	r, err := w.Next(ctx)
	if err != nil || r.Output != "back\n" {
		t.Fatalf("after a Redis restart: %+v, %v; want the job's result by its notification", r, err)
	}
}
