package jobs

import (
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/sandboxpool"
)

// TestLatestTickAfterALongPause: a worker paused for two days over an
// @every 1s schedule fires the latest tick, not one from a day ago; one
// paused less than a tick fires none.
func TestLatestTickAfterALongPause(t *testing.T) {
	cs, loc, err := ParseCron("@every 1s", "")
	if err != nil {
		t.Fatal(err)
	}
	upTo := time.Date(2026, 12, 3, 3, 0, 0, 500_000_000, time.UTC)
	got, ok := latestTick(cs, loc, upTo.Add(-48*time.Hour), upTo)
	if want := upTo.Truncate(time.Second); !ok || !got.Equal(want) {
		t.Errorf("latest tick after a 48 h pause: %v (%v), want %v", got.UTC(), ok, want)
	}
	if got, ok := latestTick(cs, loc, upTo.Add(-400*time.Millisecond), upTo); ok {
		t.Errorf("latest tick in 400 ms with none: %v", got.UTC())
	}
	daily, loc, err := ParseCron("0 3 * * *", "")
	if err != nil {
		t.Fatal(err)
	}
	got, ok = latestTick(daily, loc, upTo.Add(-10*24*time.Hour), upTo.Add(-time.Hour))
	if want := time.Date(2026, 12, 2, 3, 0, 0, 0, time.UTC); !ok || !got.Equal(want) {
		t.Errorf("latest daily tick: %v (%v), want %v", got.UTC(), ok, want)
	}
}

// TestScheduleThatNeverRuns: a spec with no tick (the 30th of February) is
// refused; one stored anyway (by an older boxq) leaves the workers' loop
// asleep until the next reload, rather than waking it every millisecond.
func TestScheduleThatNeverRuns(t *testing.T) {
	s := Schedule{Name: "never", Cron: "0 0 30 2 *", Task: "t", Job: &Job{Command: "true"}}
	if err := s.Validate(); err == nil || !strings.Contains(err.Error(), "never runs") {
		t.Errorf("Validate(%q) = %v, want an error saying it never runs", s.Cron, err)
	}

	rdb, _ := redistest.New(t)
	prod, err := NewProducer(rdb, ProducerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(s)
	if err := rdb.HSet(context.Background(), prod.store.schedulesKey(), s.Name, b).Err(); err != nil {
		t.Fatal(err)
	}
	var wakes atomic.Int64
	now := func() time.Time { wakes.Add(1); return time.Now() }
	sc := NewScheduler(prod, sandboxpool.NewIndex(rdb, ""), time.Hour, now, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := sc.Run(ctx); err != nil {
		t.Fatal(err)
	}
	// One pass reads the clock a few times; a loop woken every
	// millisecond reads it hundreds of times in 300 ms.
	if n := wakes.Load(); n > 50 {
		t.Errorf("the scheduler read the clock %d times in 300 ms: it spins", n)
	}
}
