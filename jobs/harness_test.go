package jobs_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperWorkerEnv) != "" {
		os.Exit(helperWorkerMain())
	}
	goleak.VerifyTestMain(redistest.Wrap(m),
		// go-redis keeps a pool reaper per client for its lifetime; the
		// clients are closed at cleanup, after goleak's check of the test.
		goleak.IgnoreTopFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).reaper"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

const testToken = "test-token-Zq8s1"

// stack is a real Redis, a real reference gateway (in-process, real bash
// processes), a pool, a gateway client and a producer.
type stack struct {
	rdb      *redis.Client
	redisURL string
	gw       *local.Server
	gwURL    string
	client   *gateway.Client
	pool     *sandboxpool.Pool
	prod     *jobs.Producer
}

type stackOptions struct {
	isolation local.Isolation
	// front, when set, wraps the gateway's handler (fault injection).
	front func(http.Handler) http.Handler
	// maxSandboxes caps the gateway's live sandboxes (0: its default).
	maxSandboxes int
}

func newStack(t *testing.T, o stackOptions) *stack {
	t.Helper()
	rdb, url := redistest.New(t)
	if o.isolation == "" {
		o.isolation = local.IsolationNone
	}
	gw, err := local.New(local.Config{Token: testToken, Isolation: o.isolation, JanitorInterval: 50 * time.Millisecond, MaxSandboxes: o.maxSandboxes})
	if err != nil {
		t.Fatalf("start gateway: %v", err)
	}
	var h http.Handler = gw.Handler()
	if o.front != nil {
		h = o.front(h)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(func() {
		srv.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = gw.Close(ctx)
	})
	client, err := gateway.New(gateway.Config{BaseURL: srv.URL, Token: testToken})
	if err != nil {
		t.Fatal(err)
	}
	pool, err := sandboxpool.New(rdb, client, sandboxpool.Config{LeaseTTL: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	prod, err := jobs.NewProducer(rdb, jobs.ProducerConfig{Sweep: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return &stack{rdb: rdb, redisURL: url, gw: gw, gwURL: srv.URL, client: client, pool: pool, prod: prod}
}

// startWorker runs a worker until the test ends or stop is called.
func (s *stack) startWorker(t *testing.T, mod func(*jobs.WorkerConfig)) (stop func()) {
	t.Helper()
	_, stop = s.startWorkerW(t, mod)
	return stop
}

// startWorkerW is startWorker, with the worker.
func (s *stack) startWorkerW(t *testing.T, mod func(*jobs.WorkerConfig)) (w *jobs.Worker, stop func()) {
	t.Helper()
	cfg := jobs.WorkerConfig{
		Redis: s.rdb, Gateway: s.client, Pool: s.pool, Concurrency: 32,
		ShutdownTimeout: 2 * time.Second, ReapEvery: -1,
		DelayedTaskCheckInterval: 100 * time.Millisecond,
	}
	if mod != nil {
		mod(&cfg)
	}
	w, err := jobs.NewWorker(cfg)
	if err != nil {
		t.Fatalf("NewWorker: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = w.Run(ctx); close(done) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				t.Errorf("worker did not stop within 30s")
			}
		})
	}
	t.Cleanup(stop)
	return w, stop
}

// runJobs enqueues the jobs and waits (bounded) for every result, returned
// by job id.
func (s *stack) runJobs(t *testing.T, timeout time.Duration, js ...jobs.Job) map[string]jobs.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	w, err := s.prod.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for _, j := range js {
		e, err := s.prod.Enqueue(ctx, j, w.Channel())
		if err != nil {
			t.Fatalf("Enqueue(%+v): %v", j, err)
		}
		w.Add(e)
	}
	out := map[string]jobs.Result{}
	for w.Pending() > 0 {
		r, err := w.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for results (%d of %d in): %v", len(out), len(js), err)
		}
		if _, dup := out[r.ID]; dup {
			t.Errorf("two results for job %s", r.ID)
		}
		out[r.ID] = r
	}
	return out
}

// submit subscribes a waiter, then enqueues j with it: the waiter cannot
// miss the result. The waiter is closed when the test ends.
func (s *stack) submit(t *testing.T, ctx context.Context, j jobs.Job) (*jobs.Waiter, jobs.Enqueued) {
	t.Helper()
	w, err := s.prod.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	e, err := s.prod.Enqueue(ctx, j, w.Channel())
	if err != nil {
		t.Fatalf("Enqueue(%+v): %v", j, err)
	}
	w.Add(e)
	return w, e
}

// run1 runs one job and returns its result.
func (s *stack) run1(t *testing.T, j jobs.Job) jobs.Result {
	t.Helper()
	if j.ID == "" {
		j.ID = t.Name() + "-" + randID()
	}
	return s.runJobs(t, 60*time.Second, j)[j.ID]
}

// waitFor polls cond until it holds or the deadline passes. Used only to
// observe outside processes (files, the gateway's list), never to order
// the test's own goroutines.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// taskInfo reads a job's asynq task info.
func taskInfo(t *testing.T, rdb redis.UniversalClient, id string) *asynq.TaskInfo {
	t.Helper()
	info, err := asynq.NewInspectorFromRedisClient(rdb).GetTaskInfo(jobs.DefaultQueue, id)
	if err != nil {
		t.Fatalf("GetTaskInfo(%s): %v", id, err)
	}
	return info
}

func decodeResult(t *testing.T, b []byte) jobs.Result {
	t.Helper()
	var r jobs.Result
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("decode result %q: %v", b, err)
	}
	return r
}

func randID() string {
	return strings.ReplaceAll(time.Now().Format("150405.000000000"), ".", "")
}

func ptr[T any](v T) *T { return &v }
