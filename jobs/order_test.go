package jobs

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/hibiken/asynq"
)

// TestOrderChain: each job follows the task's last job that was really
// enqueued. A job sent again is not a new last job (else the job after it
// would skip the one in between), and a job whose enqueue failed is taken
// back out (else a later job would wait for a job that may be sent again
// after it, and the two would wait for each other).
func TestOrderChain(t *testing.T) {
	rdb, _ := redistest.New(t)
	p, err := NewProducer(rdb, ProducerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	insp := asynq.NewInspectorFromRedisClient(rdb)
	after := func(id string) string {
		t.Helper()
		info, err := insp.GetTaskInfo(DefaultQueue, id)
		if err != nil {
			t.Fatalf("task %s: %v", id, err)
		}
		var pl ExecPayload
		if err := json.Unmarshal(info.Payload, &pl); err != nil {
			t.Fatal(err)
		}
		return pl.AfterID
	}
	enqueue := func(id string) Enqueued {
		t.Helper()
		e, err := p.Enqueue(ctx, Job{ID: id, TaskID: "t", Command: "true"}, "")
		if err != nil {
			t.Fatal(err)
		}
		return e
	}

	enqueue("a")
	enqueue("b")
	if e := enqueue("a"); !e.Existed {
		t.Fatal("a enqueued twice")
	}
	enqueue("c")
	for id, want := range map[string]string{"a": "", "b": "a", "c": "b"} {
		if got := after(id); got != want {
			t.Errorf("%s runs after %q, want %q", id, got, want)
		}
	}

	// d's enqueue failed after its place was taken: undone, e follows c.
	if _, _, err := p.store.chain(ctx, "t", DefaultQueue, "d", time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := p.store.unchain(ctx, "t", "d", DefaultQueue, "c", time.Hour); err != nil {
		t.Fatal(err)
	}
	enqueue("e")
	if got := after("e"); got != "c" {
		t.Errorf("e runs after %q, want c", got)
	}
	// Undoing a job that is no longer the last changes nothing.
	if err := p.store.unchain(ctx, "t", "d", DefaultQueue, "c", time.Hour); err != nil {
		t.Fatal(err)
	}
	enqueue("f")
	if got := after("f"); got != "e" {
		t.Errorf("f runs after %q, want e", got)
	}
}
