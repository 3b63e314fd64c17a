package local

import (
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/boxq/boxq/gateway"
)

// BenchmarkExecTrue measures the round trip of `true` over HTTP, start to
// terminal state, as a client sees it: the start, then long polls while
// the answer is "running". With the start wait off, every exec costs a
// start and a poll; with it on, a fast command is answered by the start.
func BenchmarkExecTrue(b *testing.B) {
	for _, mode := range []Isolation{IsolationNone, IsolationBwrap} {
		for _, wait := range []time.Duration{-1, DefaultStartWait} {
			name := fmt.Sprintf("%s/startwait=%v", mode, wait)
			if wait < 0 {
				name = fmt.Sprintf("%s/startwait=off", mode)
			}
			b.Run(name, func(b *testing.B) {
				if mode == IsolationBwrap {
					requireBwrap(b)
				}
				g := newGateway(b, Config{Isolation: mode, StartWait: wait})
				sb := g.newSandbox(b)
				polls := 0
				i := 0
				for b.Loop() {
					i++
					req := gateway.StartRequest{ExecID: fmt.Sprint("bench-", i), Command: "true", TimeoutMs: 10_000}
					var st gateway.ExecState
					decode(b, "start", g.do(b, "POST", "/v1/sandboxes/"+sb+"/execs", req), http.StatusOK, &st)
					for !gateway.Terminal(st.Status) {
						polls++
						decode(b, "poll", g.poll(b, sb, req.ExecID, gateway.MaxWaitMs), http.StatusOK, &st)
					}
					if st.Status != gateway.StatusCompleted {
						b.Fatalf("got %s/%d %q, want completed", st.Status, st.RC(), st.Output)
					}
				}
				b.ReportMetric(float64(polls)/float64(i), "polls/op")
			})
		}
	}
}
