package main

import (
	"context"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
)

func cpuSelf() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestScratchRatio(t *testing.T) {
	if os.Getenv("SCRATCH") == "" {
		t.Skip()
	}
	ctx := context.Background()
	o, _ := parseFlags([]string{"-quick"}, os.Stdout)
	e, err := newEnv(ctx, o, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer e.close()
	c, _ := e.redis.client(ctx, 0, 0)
	n, _ := strconv.Atoi(os.Getenv("N"))
	conc, _ := strconv.Atoi(os.Getenv("C"))
	measure := func(f func() (float64, error)) (float64, float64, float64) {
		_, r0, _ := redisStats(ctx, c)
		c0 := cpuSelf()
		v, err := f()
		if err != nil {
			t.Fatal(err)
		}
		_, r1, _ := redisStats(ctx, c)
		return v, float64(cpuSelf()-c0) / float64(n) / 1e3, (r1 - r0) * 1e6 / float64(n)
	}
	null, err := e.newPipelineRunner(ctx, instantGateway{}, 200, conc)
	if err != nil {
		t.Fatal(err)
	}
	defer null.close()
	noop, err := e.newNoopRunner(ctx, conc)
	if err != nil {
		t.Fatal(err)
	}
	defer noop.close()
	for range 4 {
		a, ag, ar := measure(func() (float64, error) { return null.round(ctx, n) })
		b, bg, br := measure(func() (float64, error) { return noop.round(ctx, n) })
		t.Logf("null %.0f/s go %.0fus redis %.0fus | noop %.0f/s go %.0fus redis %.0fus | ratio %.2f  load %s", a, ag, ar, b, bg, br, a/b, loadavg())
	}
}

func loadavg() string { b, _ := os.ReadFile("/proc/loadavg"); return string(b[:14]) }
