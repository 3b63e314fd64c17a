package jobs

import (
	"testing"
	"time"
)

// TestEveryLog: one line per period, and the next one says how many were
// held back.
func TestEveryLog(t *testing.T) {
	e := &everyLog{every: 10 * time.Second}
	t0 := time.Unix(1000, 0)
	steps := []struct {
		at       time.Duration
		ok       bool
		wantHeld int
	}{
		{0, true, 0},
		{time.Second, false, 0},
		{9 * time.Second, false, 0},
		{10 * time.Second, true, 2},
		{11 * time.Second, false, 0},
		{30 * time.Second, true, 1},
	}
	for _, s := range steps {
		held, ok := e.allow(t0.Add(s.at))
		if ok != s.ok || held != s.wantHeld {
			t.Errorf("allow at +%v = %d, %v; want %d, %v", s.at, held, ok, s.wantHeld, s.ok)
		}
	}
}
