package main

import (
	"context"
	"os"
	"runtime"
	"runtime/pprof"
	"testing"
)

func TestScratchAllocs(t *testing.T) {
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
	null, err := e.newPipelineRunner(ctx, instantGateway{}, 200, 64)
	if err != nil {
		t.Fatal(err)
	}
	defer null.close()
	runtime.MemProfileRate = 4096
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	v, err := null.round(ctx, 5000)
	runtime.ReadMemStats(&m1)
	t.Logf("%.0f/s, %.0f allocs/job, %.0f B/job", v, float64(m1.Mallocs-m0.Mallocs)/5000, float64(m1.TotalAlloc-m0.TotalAlloc)/5000)
	f, _ := os.Create("/tmp/allocs.prof")
	pprof.Lookup("allocs").WriteTo(f, 0)
	f.Close()
}
