package app

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/boxq/boxq/jobs"
)

// ParseQueues reads a -queues value: "name=weight,name=weight" (asynq's
// weighted priority: a queue of weight 3 is tried first three times as
// often as one of weight 1); a name alone has weight 1.
func ParseQueues(s string) (map[string]int, error) {
	qs := map[string]int{}
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, weight, hasWeight := strings.Cut(part, "=")
		name = strings.TrimSpace(name)
		w := 1
		if hasWeight {
			n, err := strconv.Atoi(strings.TrimSpace(weight))
			if err != nil || n < 1 {
				return nil, fmt.Errorf("-queues: %q: the weight must be a whole number ≥ 1, as in default=3,batch=1", part)
			}
			w = n
		}
		switch {
		case name == "":
			return nil, fmt.Errorf("-queues: %q: missing queue name, as in default=3,batch=1", part)
		case name == jobs.MaintenanceQueue:
			return nil, fmt.Errorf("-queues: %q is boxq's own queue (terminate, reap), which every worker serves anyway: leave it out", name)
		case strings.ContainsAny(name, "{}:"):
			return nil, fmt.Errorf("-queues: %q is not a valid queue name (no braces or colons)", name)
		}
		if _, dup := qs[name]; dup {
			return nil, fmt.Errorf("-queues: queue %q is listed twice", name)
		}
		qs[name] = w
	}
	if len(qs) == 0 {
		return nil, fmt.Errorf("-queues: no queue in %q; want e.g. default=3,batch=1", s)
	}
	return qs, nil
}

// FormatQueues writes queues as ParseQueues reads them, sorted by name.
func FormatQueues(qs map[string]int) string {
	if len(qs) == 0 {
		return jobs.DefaultQueue + "=1"
	}
	names := slices.Sorted(func(yield func(string) bool) {
		for q := range qs {
			if !yield(q) {
				return
			}
		}
	})
	parts := make([]string, len(names))
	for i, q := range names {
		parts[i] = q + "=" + strconv.Itoa(qs[q])
	}
	return strings.Join(parts, ",")
}
