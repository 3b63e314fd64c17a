package jobs_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
)

// TestFanOutCostIn100kPool is the fan-out's whole Redis cost, as `enqueue
// -tasks 'eval-42/*'` spends it (cmd/enqueue/fanout.go): find the 10
// matching tasks in an index of 100,010, then enqueue one job each. The
// find is one command whatever the pool's size (also
// sandboxpool.TestMatchCostFollowsThePrefix); the enqueue is a few
// commands per job, none that grows with the pool.
func TestFanOutCostIn100kPool(t *testing.T) {
	s := newStack(t, stackOptions{})
	ctx := context.Background()
	pipe := s.rdb.Pipeline()
	for i := range 100_000 {
		pipe.ZAdd(ctx, "boxq:tasks", redis.Z{Member: fmt.Sprintf("bulk-%06d", i)})
	}
	for i := range 10 {
		pipe.ZAdd(ctx, "boxq:tasks", redis.Z{Member: fmt.Sprintf("eval-42/%d", i)})
	}
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatal(err)
	}

	var sent redistest.CommandCounter
	counted := redis.NewClient(s.rdb.Options())
	t.Cleanup(func() { counted.Close() })
	if err := counted.Ping(ctx).Err(); err != nil { // the handshake is no fan-out's cost
		t.Fatal(err)
	}
	counted.AddHook(&sent)
	prod, err := jobs.NewProducer(counted, jobs.ProducerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.rdb.ConfigResetStat(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	base := redistest.CallsInRedis(t, s.rdb) // the INFO of this very read counts once

	tasks, err := prod.MatchTasks(ctx, "eval-42/*")
	if err != nil {
		t.Fatal(err)
	}
	if len(tasks) != 10 {
		t.Fatalf("MatchTasks found %d tasks, want 10: %q", len(tasks), tasks)
	}
	findSent := sent.N()
	findCalls := redistest.CallsInRedis(t, s.rdb) - base - 1
	for _, task := range tasks {
		if _, err := prod.Enqueue(ctx, jobs.Job{TaskID: task, Command: "true"}, ""); err != nil {
			t.Fatal(err)
		}
	}
	enqSent := sent.N() - findSent
	enqCalls := redistest.CallsInRedis(t, s.rdb) - base - 2 - findCalls
	t.Logf("pool of 100,010 tasks, 10 matches: find %d sent / %d calls in Redis; enqueue of 10 jobs %d sent / %d calls",
		findSent, findCalls, enqSent, enqCalls)
	if findSent != 1 {
		t.Errorf("finding 10 tasks in 100,010 sent %d commands, want 1", findSent)
	}
	// Counts, not times: what would grow with the pool (a scan, a listing
	// of the queue) would show here as hundreds.
	if enqSent > 10*4 {
		t.Errorf("enqueueing 10 jobs sent %d commands, want at most 4 per job", enqSent)
	}
	if enqCalls > 10*15 {
		t.Errorf("enqueueing 10 jobs ran %d calls in Redis, want at most 15 per job", enqCalls)
	}
}
