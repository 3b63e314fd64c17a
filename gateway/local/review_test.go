package local

import (
	"net/http"
	"runtime"
	"testing"
	"weak"

	"github.com/boxq/boxq/gateway"
)

// TestEndedSandboxFreesOutputs checks that the outputs of a sandbox's
// finished execs are freed when the sandbox ends, not kept for the rest of
// their retention by the retention queue, uncounted: a loop of create, a
// 1 MiB exec and terminate would otherwise hold every output in memory,
// outside the caps on retained execs.
func TestEndedSandboxFreesOutputs(t *testing.T) {
	g := newGateway(t, Config{})
	sb := g.newSandbox(t)
	st := g.run(t, sb, "head -c 100000 /dev/zero | tr '\\0' x")
	if st.Status != gateway.StatusCompleted {
		t.Fatalf("exec: got %s/%d", st.Status, st.RC())
	}
	// In a function of its own, so that no stack slot of this one keeps
	// the exec alive.
	ref := func() weak.Pointer[execution] {
		e, err := g.srv.execOf(sb, st.ExecID)
		if err != nil {
			t.Fatal(err)
		}
		return weak.Make(e)
	}()
	decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", nil), http.StatusOK, nil)
	for range 3 {
		runtime.GC()
	}
	if ref.Value() != nil {
		t.Errorf("the exec of an ended sandbox, and its output, are still in memory")
	}
	g.srv.mu.Lock()
	count, bytes := g.srv.retainedCount, g.srv.retainedBytes
	g.srv.mu.Unlock()
	if count != 0 || bytes != 0 {
		t.Errorf("after the sandbox ended: %d execs, %d bytes counted as retained, want none", count, bytes)
	}
}
