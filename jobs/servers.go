package jobs

import (
	"fmt"
	"maps"
	"slices"
)

// QueuesServed returns the queues that live workers serve, with how many
// workers serve each. asynq lists a server while its heartbeat is fresh
// (a few seconds), so a worker that died drops out on its own.
func (p *Producer) QueuesServed() (map[string]int, error) {
	servers, err := p.insp.Servers()
	if err != nil {
		return nil, fmt.Errorf("jobs: list workers: %w", err)
	}
	served := map[string]int{}
	for _, s := range servers {
		if s.Status != "active" {
			continue
		}
		for q := range s.Queues {
			served[q]++
		}
	}
	return served, nil
}

// Outstanding returns the ids of the jobs that have no result yet, sorted.
func (w *Waiter) Outstanding() []string {
	ids := slices.Collect(maps.Keys(w.pending))
	for _, r := range w.ready {
		ids = append(ids, r.ID)
	}
	slices.Sort(ids)
	return ids
}

// Queues returns the queues of the outstanding jobs, sorted.
func (w *Waiter) Queues() []string {
	set := map[string]bool{}
	for _, pj := range w.pending {
		set[pj.queue] = true
	}
	return slices.Sorted(maps.Keys(set))
}
