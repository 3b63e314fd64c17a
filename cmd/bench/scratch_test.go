package main

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/boxq/boxq/wrap"
)

func TestScratchDirect(t *testing.T) {
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
	for _, c := range []string{"true", wrap.Command("true", "/root", wrap.Marker(wrap.NewNonce())), "sleep 0.01", wrap.Command("sleep 0.01", "/root", wrap.Marker(wrap.NewNonce()))} {
		ds, err := e.directRTT(ctx, e.gw, c, 100)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%-12.12q p50 %v", c, percentile(ds, 50).Round(10*time.Microsecond))
	}
}
