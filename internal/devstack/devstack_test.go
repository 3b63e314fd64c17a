package devstack

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/limits"
	"github.com/boxq/boxq/gateway/local"
)

// TestEmbeddedGatewayEnforcesLimits: the gateway of worker -dev and
// enqueue -dev has no shim binary, yet as root on a cgroup v1 machine its
// sandboxes get their memory limit (through the sh shim): a command over
// it is OOM-killed, rc 137.
func TestEmbeddedGatewayEnforcesLimits(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("BOXQ_REQUIRE_BWRAP") != "" {
			t.Fatal("BOXQ_REQUIRE_BWRAP is set but the tests do not run as root: limits need it")
		}
		t.Skip("cgroup limits need root")
	}
	c, err := limits.Detect(limits.Config{ShimPath: "-"})
	if err != nil {
		t.Fatal(err)
	}
	mode, holds := c.Mode(), c.Holds()
	_ = c.Close()
	if mode == limits.ModeNone || !holds.Memory {
		t.Skipf("cgroups %s, holds %+v: no memory controller here", mode, holds)
	}
	s, err := Start(slog.New(slog.DiscardHandler), local.IsolationAuto)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Error(err)
		}
	})
	gw, err := gateway.New(gateway.Config{BaseURL: s.GatewayURL, Token: s.Token})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	id, err := gw.Create(ctx, uuid.NewString(), gateway.CreateRequest{Cwd: "/root", MemoryMiB: 64})
	if err != nil {
		t.Fatal(err)
	}
	list, err := gw.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sb := range list {
		if sb.ID == id && (sb.Limits == nil || !sb.Limits.Memory) {
			t.Errorf("listed limits %+v, want memory held", sb.Limits)
		}
	}
	// tail keeps all of a newline-free input: 512 MiB against 64.
	st, err := gw.Run(ctx, id, gateway.StartRequest{ExecID: uuid.NewString(), Command: "head -c 512M /dev/zero | tail > /dev/null", TimeoutMs: 30000})
	if err != nil {
		t.Fatal(err)
	}
	if st.ReturnCode == nil || *st.ReturnCode != 137 || !strings.Contains(st.Output, "memory limit") {
		t.Errorf("512 MiB under memoryMiB 64 (isolation %s): %s rc %v output %q; want rc 137 and a line about the memory limit", s.Isolation, st.Status, st.ReturnCode, st.Output)
	}
}
