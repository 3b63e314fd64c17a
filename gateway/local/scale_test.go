package local

import (
	"fmt"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxq/boxq/gateway"
)

func TestThousandRunningExecs(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 1,000 processes")
	}
	const n = 1000
	g := newGateway(t, Config{StartWait: -1, MaxSandboxRunningExecs: n})
	sandboxes := []string{g.newSandbox(t), g.newSandbox(t), g.newSandbox(t), g.newSandbox(t)}

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	goroutinesBefore := runtime.NumGoroutine()

	begin := time.Now()
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := range jobs {
				sb := sandboxes[i%len(sandboxes)]
				req := gateway.StartRequest{ExecID: fmt.Sprint("e-", i), Command: "sleep 60", TimeoutMs: 120_000}
				r, err := g.send("POST", "/v1/sandboxes/"+sb+"/execs", req, "")
				if err != nil || r.status != http.StatusOK {
					t.Errorf("start %d: got %d %s, %v", i, r.status, r.body, err)
				}
			}
		})
	}
	for i := range n {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("started %d execs in %v", n, time.Since(begin))
	if got := g.srv.running.Load(); got != n {
		t.Fatalf("got %d running execs, want %d", got, n)
	}

	runtime.GC()
	runtime.ReadMemStats(&after)
	heap := (int64(after.HeapAlloc) - int64(before.HeapAlloc)) / n
	stack := (int64(after.StackInuse) - int64(before.StackInuse)) / n
	goroutines := float64(runtime.NumGoroutine()-goroutinesBefore) / n
	nthreads := threads(t)
	t.Logf("per running exec: %d B heap, %d B goroutine stacks, %.2f goroutines; %d OS threads in all", heap, stack, goroutines, nthreads)
	if nthreads > n/10 {
		t.Errorf("got %d OS threads for %d running execs, want a waiting exec to hold none", nthreads, n)
	}
	// Loose: what matters is that an exec costs kilobytes, not megabytes.
	if heap+stack > 128<<10 {
		t.Errorf("a running exec costs %d B, want well under 128 KiB", heap+stack)
	}

	begin = time.Now()
	for _, sb := range sandboxes {
		decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", nil), http.StatusOK, nil)
	}
	t.Logf("terminated %d sandboxes with %d running execs in %v", len(sandboxes), n, time.Since(begin))
	if got := g.srv.running.Load(); got != 0 {
		t.Errorf("after terminate: got %d running execs, want 0", got)
	}
}

// threads returns the number of OS threads of this process.
func threads(t *testing.T) int {
	t.Helper()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads line in /proc/self/status")
	return 0
}
