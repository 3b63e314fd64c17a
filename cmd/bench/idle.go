package main

import (
	"context"
	"time"
)

// idleLoad is the load an idle worker puts on Redis.
type idleLoad struct {
	OpsPerS float64 `json:"ops_per_s"`
	CPUPct  float64 `json:"cpu_pct"` // of one core, Redis user + system time
}

// idleRedisLoad starts a worker with the given task check interval and no
// jobs, and counts the commands Redis processes, and the CPU it uses,
// over window.
func (e *env) idleRedisLoad(ctx context.Context, interval, window time.Duration) (idleLoad, error) {
	r, err := e.startRig(ctx, instantGateway{}, e.opts.concurrency, interval)
	if err != nil {
		return idleLoad{}, err
	}
	defer r.stop()
	// Let the server's start-up traffic (scripts, registration) pass.
	if !pause(ctx, 500*time.Millisecond) {
		return idleLoad{}, ctx.Err()
	}
	c0, cpu0, err := redisStats(ctx, r.prdb)
	if err != nil {
		return idleLoad{}, err
	}
	start := time.Now()
	if !pause(ctx, window) {
		return idleLoad{}, ctx.Err()
	}
	c1, cpu1, err := redisStats(ctx, r.prdb)
	if err != nil {
		return idleLoad{}, err
	}
	secs := time.Since(start).Seconds()
	// The first INFO is counted in the second's total.
	return idleLoad{OpsPerS: float64(c1-c0-1) / secs, CPUPct: 100 * (cpu1 - cpu0) / secs}, nil
}
