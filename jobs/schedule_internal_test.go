package jobs

import (
	"testing"
	"time"
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
