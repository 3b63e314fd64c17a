package reliability

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/internal/syncbuf"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

// inProcessWorkers runs n workers in this process, against c's Redis and a
// gateway at gatewayURL, with a gateway client whose timeouts are short,
// so that answers held back by a fault proxy make it time out and retry.
// They stop when the test ends.
func (c *cluster) inProcessWorkers(t *testing.T, n int, gatewayURL string, logs *syncbuf.Buffer) {
	t.Helper()
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	for i := range n {
		client, err := gateway.New(gateway.Config{
			BaseURL: gatewayURL, Token: c.gw.token, Logger: log.With("component", "gateway"),
			CreateTimeout: 2 * time.Second, StartTimeout: 500 * time.Millisecond,
			PollTimeout: 500 * time.Millisecond, CancelTimeout: 500 * time.Millisecond,
			TerminateTimeout: 2 * time.Second, LongPoll: time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		pool, err := sandboxpool.New(c.rdb, client, sandboxpool.Config{LeaseTTL: 5 * time.Second, Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		w, err := jobs.NewWorker(jobs.WorkerConfig{
			Redis: c.rdb, Gateway: client, Pool: pool, Concurrency: 16,
			IdleTTL: 3 * time.Second, ReapEvery: time.Second, ShutdownTimeout: 2 * time.Second,
			DelayedTaskCheckInterval: 100 * time.Millisecond,
			Logger:                   log.With("worker", i),
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			if err := w.Run(ctx); err != nil {
				t.Errorf("worker %d: %v", i, err)
			}
		}()
		t.Cleanup(func() {
			cancel()
			<-done
		})
	}
	t.Cleanup(func() {
		if t.Failed() {
			lines := logs.Lines()
			t.Logf("last log lines of the in-process workers:\n%s", strings.Join(lines[max(0, len(lines)-40):], "\n"))
		}
	})
}

// TestGatewayFaults puts a proxy between the workers and the gateway that
// fails a share of the requests at random (seeded): it drops connections
// before or after forwarding, answers 502 or 503, holds answers until the
// client's timeout, and answers 429 with Retry-After. The batch must
// complete with every result right and no command run twice.
func TestGatewayFaults(t *testing.T) {
	for _, rate := range []float64{0.10, 0.30} {
		t.Run(fmt.Sprintf("rate=%v", rate), func(t *testing.T) {
			t.Parallel()
			c := newCluster(t, clusterOptions{})
			seed := uint64(time.Now().UnixNano())
			proxy, err := NewFaultProxy(FaultConfig{Target: c.gw.url, Rate: rate, Seed: seed})
			if err != nil {
				t.Fatal(err)
			}
			front := httptest.NewServer(proxy)
			t.Cleanup(func() {
				front.Close()
				proxy.Close()
			})
			logs := &syncbuf.Buffer{}
			c.inProcessWorkers(t, 3, front.URL, logs)
			n, tasks := pick(90, 300), pick(15, 30)
			t.Logf("%d jobs over %d tasks, 3 workers, fault rate %v, seed %d", n, tasks, rate, seed)
			b := c.enqueue(t, makeBatch("fault", n, tasks, "0.2"))
			b.collect(t, pick(3*time.Minute, 10*time.Minute), nil)
			batchTime := time.Since(b.started)
			b.checkOneAnswer(t, c.rdb)
			b.checkCompleted(t)
			c.checkNoLeak(t, 60*time.Second)
			ran := b.checkRanOnce(t, c.gw.stateDir)
			counts := proxy.Counts()
			var total, faults int64
			var parts []string
			for f := FaultNone; f < numFaults; f++ {
				total += counts[f]
				if f != FaultNone {
					faults += counts[f]
					parts = append(parts, fmt.Sprintf("%v %d", f, counts[f]))
				}
			}
			retried := 0
			for _, r := range b.got {
				if r.Attempts > 1 {
					retried++
				}
			}
			t.Logf("batch: %d jobs, %d results in %v, %d needed more than one attempt; %d command runs for %d jobs",
				n, len(b.got), batchTime.Round(100*time.Millisecond), retried, ran, n)
			t.Logf("gateway requests: %d, faults: %d (%.1f%%): %s", total, faults, 100*float64(faults)/float64(max(total, 1)), strings.Join(parts, ", "))
			t.Logf("all jobs, enqueue to result: %s", b.latencies())
			if faults == 0 {
				t.Errorf("the proxy injected no fault: the test proved nothing")
			}
		})
	}
}

// TestGatewayRestart kills the reference gateway (SIGKILL: its sandboxes
// and their files are lost) in the middle of a batch and starts it again
// on the same address. Every job must end — completed, on a recreated
// sandbox when its task's sandbox was lost, or with an error that says what
// happened — never hang, and never give a wrong result.
func TestGatewayRestart(t *testing.T) {
	t.Parallel()
	c := newCluster(t, clusterOptions{})
	for range 3 {
		c.startWorker(t)
	}
	var (
		n, tasks = pick(60, 300), pick(12, 30)
		restarts = pick(1, 3)
		gap      = pick(time.Second, 3*time.Second)
		down     = 2 * time.Second
	)
	t.Logf("%d jobs over %d tasks, 3 workers, %d gateway kills spread over the batch (down %v each)", n, tasks, restarts, down)
	b := c.enqueue(t, makeBatch("gwr", n, tasks, pick("1", "2")))
	var killedAt []time.Time
	var last time.Time
	b.collect(t, pick(3*time.Minute, 10*time.Minute), func() {
		if !b.faultDue(len(killedAt), restarts, last, gap, 0) {
			return
		}
		killedAt = append(killedAt, time.Now())
		c.gw.signal(syscall.SIGKILL)
		<-c.gw.done
		time.Sleep(down)
		c.gw.start(t, nil)
		last = time.Now()
	})
	batchTime := time.Since(b.started)
	b.checkOneAnswer(t, c.rdb)
	var completed, recreated, failed int
	for _, j := range b.jobs {
		r := b.got[j.ID]
		switch {
		case r.Status == jobs.StatusCompleted && r.ReturnCode == 0 && r.Output == wantOutput(j.ID):
			completed++
			if r.SandboxRecreated {
				recreated++
			}
		case r.Status == jobs.StatusError && strings.Contains(r.Error, "not run again"):
			failed++
			if failed <= 3 {
				t.Logf("job %s ended in error: %s", j.ID, r.Error)
			}
		default:
			t.Errorf("job %s: wrong result: %s/%d output %q error %q", j.ID, r.Status, r.ReturnCode, r.Output, r.Error)
		}
	}
	c.checkNoLeak(t, 90*time.Second)
	// A killed gateway loses the files of its live sandboxes, so the runs
	// of those cannot be counted; what is left must show no command twice.
	ran, _ := runCounts(t, c.gw.stateDir)
	for id, k := range ran {
		if k > 1 {
			t.Errorf("job %s: its command ran %d times", id, k)
		}
	}
	t.Logf("batch: %d jobs, %d results in %v: %d completed (%d of them on a recreated sandbox), %d ended in error; %d gateway kills",
		n, len(b.got), batchTime.Round(100*time.Millisecond), completed, recreated, failed, len(killedAt))
	t.Logf("all jobs, enqueue to result: %s", b.latencies())
	if len(killedAt) < restarts {
		t.Errorf("the batch ended after %d of %d gateway kills: make it longer", len(killedAt), restarts)
	}
	if recreated == 0 {
		t.Errorf("no job ran on a recreated sandbox: the restart hit nothing")
	}
}

// TestStartAnswerLostThenRefused: the first start of a job's exec reaches
// the gateway but its answer is lost (503 after forwarding), and the retry
// is refused for capacity (429, not forwarded). The command is running,
// though the worker never heard so; the next command of the task must not
// start until it has ended, and the job must come back for it rather than
// run it again.
func TestStartAnswerLostThenRefused(t *testing.T) {
	t.Parallel()
	c := newCluster(t, clusterOptions{})
	first := jobs.Job{ID: "lost-a", TaskID: "lost", Command: fmt.Sprintf(jobScript, "lost-a", "2"), TimeoutS: ptr(60.0)}
	second := jobs.Job{ID: "lost-b", TaskID: "lost", Command: fmt.Sprintf(jobScript, "lost-b", "0.1"), TimeoutS: ptr(60.0)}
	execA := []byte(jobs.ExecID(first.ID))
	var starts atomic.Int32
	refused := make(chan struct{})
	proxy, err := NewFaultProxy(FaultConfig{Target: c.gw.url, Choose: func(r *http.Request, body []byte) Fault {
		if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/execs") && bytes.Contains(body, execA) {
			switch starts.Add(1) {
			case 1:
				return Fault503After
			case 2:
				close(refused)
				return Fault429
			}
		}
		return FaultNone
	}})
	if err != nil {
		t.Fatal(err)
	}
	front := httptest.NewServer(proxy)
	t.Cleanup(func() {
		front.Close()
		proxy.Close()
	})
	logs := &syncbuf.Buffer{}
	c.inProcessWorkers(t, 1, front.URL, logs)
	b1 := c.enqueue(t, []jobs.Job{first})
	select {
	case <-refused:
	case <-time.After(30 * time.Second):
		t.Fatal("the first job's exec was not started twice")
	}
	b2 := c.enqueue(t, []jobs.Job{second})
	b1.collect(t, time.Minute, nil)
	b2.collect(t, time.Minute, nil)
	both := merge(b1, b2)
	both.checkOneAnswer(t, c.rdb)
	both.checkCompleted(t)
	c.checkNoLeak(t, 60*time.Second)
	both.checkRanOnce(t, c.gw.stateDir) // and the two did not overlap
}
