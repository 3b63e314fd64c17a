package main

import (
	"context"
	"fmt"
	"time"

	"github.com/boxq/boxq/sandboxpool"
)

// reapIdle fills a pool with total records, all in use a moment ago, then
// for each count in expired makes that many of them idle for an hour and
// times one ReapIdle pass. The gateway side is instant, so the time is the
// pool's: reading the index, claiming, deleting. The records are made
// through the pool's own API (Acquire and Release), so they are what a
// worker writes.
func (e *env) reapIdle(ctx context.Context, total int, expired []int) ([]time.Duration, error) {
	rdb, err := e.redis.client(ctx, e.db(), 64)
	if err != nil {
		return nil, err
	}
	defer rdb.Close()
	now := time.Now()
	at := func(t time.Time) sandboxpool.Config {
		return sandboxpool.Config{Now: func() time.Time { return t }}
	}
	fresh, err := sandboxpool.New(rdb, instantGateway{}, at(now))
	if err != nil {
		return nil, err
	}
	stale, err := sandboxpool.New(rdb, instantGateway{}, at(now.Add(-time.Hour)))
	if err != nil {
		return nil, err
	}
	touch := func(p *sandboxpool.Pool, n int) error {
		return parallel(ctx, n, 64, func(i int) error {
			l, err := p.Acquire(ctx, fmt.Sprintf("reap-%06d", i), sandboxpool.Spec{Persistent: true}, "")
			if err != nil {
				return err
			}
			return p.Release(ctx, l, "/root")
		})
	}
	begin := time.Now()
	if err := touch(fresh, total); err != nil {
		return nil, err
	}
	e.progress("reap: %d pool records written in %v", total, time.Since(begin).Round(time.Millisecond))
	var out []time.Duration
	for _, n := range expired {
		// The first n tasks (re-created where an earlier pass reaped
		// them) were last used an hour ago; the rest a moment ago.
		if err := touch(stale, n); err != nil {
			return nil, err
		}
		if live, err := fresh.Live(ctx); err != nil || live != int64(total) {
			return nil, fmt.Errorf("reap: pool holds %d records (%v), want %d", live, err, total)
		}
		start := time.Now()
		reaped, err := fresh.ReapIdle(ctx, now, 5*time.Minute)
		took := time.Since(start)
		if err != nil {
			return nil, err
		}
		if reaped != n {
			return nil, fmt.Errorf("reap: reaped %d of %d expired sandboxes", reaped, n)
		}
		out = append(out, took)
	}
	return out, nil
}
