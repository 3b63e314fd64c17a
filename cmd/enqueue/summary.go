package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/boxq/boxq/jobs"
)

// summary counts the results of a batch (or a fan-out) by status and by
// return code, and keeps their durations for percentiles. The progress
// line and the closing summary on stderr are both drawn from it.
type summary struct {
	results  int
	byStatus map[string]int
	byRC     map[int]int
	// nonZero counts completed results with a non-zero return code: they
	// are results, not errors, but a user wants to see them.
	nonZero   int
	durations []time.Duration
}

func newSummary() *summary {
	return &summary{byStatus: map[string]int{}, byRC: map[int]int{}}
}

// statuses in the order they are shown.
var statuses = []string{jobs.StatusCompleted, jobs.StatusTimeout, jobs.StatusCancelled, jobs.StatusError}

func (s *summary) add(r jobs.Result) {
	s.results++
	s.byStatus[r.Status]++
	s.byRC[r.ReturnCode]++
	if r.Status == jobs.StatusCompleted && r.ReturnCode != 0 {
		s.nonZero++
	}
	// A result that never ran (bad input, a cancel while it waited) has
	// no duration worth counting.
	if !r.StartedAt.IsZero() {
		s.durations = append(s.durations, time.Duration(r.DurationMs)*time.Millisecond)
	}
}

// errors is how many results have status "error".
func (s *summary) errors() int { return s.byStatus[jobs.StatusError] }

// statusLine says the counts by status, e.g. "completed 27 (6 rc≠0),
// timeout 1": completed always, the others when there are some.
func (s *summary) statusLine() string {
	var parts []string
	for _, st := range statuses {
		n := s.byStatus[st]
		if n == 0 && st != jobs.StatusCompleted {
			continue
		}
		p := fmt.Sprintf("%s %d", st, n)
		if st == jobs.StatusCompleted && s.nonZero > 0 {
			p += fmt.Sprintf(" (%d rc≠0)", s.nonZero)
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, ", ")
}

// rcLine says the counts by return code, most frequent first, e.g.
// "rc 0 ×47, rc 2 ×6, rc 124 ×1".
func (s *summary) rcLine() string {
	rcs := make([]int, 0, len(s.byRC))
	for rc := range s.byRC {
		rcs = append(rcs, rc)
	}
	slices.SortFunc(rcs, func(a, b int) int {
		if s.byRC[a] != s.byRC[b] {
			return s.byRC[b] - s.byRC[a]
		}
		return a - b
	})
	parts := make([]string, len(rcs))
	for i, rc := range rcs {
		parts[i] = "rc " + strconv.Itoa(rc) + " ×" + strconv.Itoa(s.byRC[rc])
	}
	return strings.Join(parts, ", ")
}

// percentile returns the p-th percentile (0..1) of the durations, nearest
// rank: the ceil(p·n)-th smallest (less a hair, so that 0.9·10 is 9, not
// 9.000000000000002 rounded up to 10).
func (s *summary) percentile(p float64) time.Duration {
	if len(s.durations) == 0 {
		return 0
	}
	d := slices.Clone(s.durations)
	slices.Sort(d)
	i := int(math.Ceil(p*float64(len(d))-1e-9)) - 1
	return d[min(max(i, 0), len(d)-1)]
}

// write prints the closing summary: counts by status, by return code, and
// the p50/p90 durations of the commands.
func (s *summary) write(w io.Writer, elapsed time.Duration) {
	fmt.Fprintf(w, "%d results in %s: %s\n", s.results, elapsed.Round(100*time.Millisecond), s.statusLine())
	if s.results == 0 {
		return
	}
	fmt.Fprintf(w, "return codes: %s\n", s.rcLine())
	if len(s.durations) > 0 {
		fmt.Fprintf(w, "command durations: p50 %s, p90 %s, max %s\n",
			roundDuration(s.percentile(.5)), roundDuration(s.percentile(.9)), roundDuration(s.percentile(1)))
	}
}

// roundDuration keeps durations short to read: ms below a second, tenths
// of seconds above.
func roundDuration(d time.Duration) time.Duration {
	if d < time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(100 * time.Millisecond)
}
