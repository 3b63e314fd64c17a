package sandboxpool

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/internal/redistest"
	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(redistest.Wrap(m))
}

// fakeGateway is a gateway that keeps sandboxes in a map. Like the real
// one, a create with a known idempotency key returns the same sandbox.
type fakeGateway struct {
	// afterCreate, when set, runs after the sandbox exists; an error it
	// returns is the create's answer (the reply was lost).
	afterCreate func(key string) error
	// beforeCreate, when set, runs first; an error it returns is the
	// create's answer, and no sandbox is made.
	beforeCreate func(key string) error
	// beforeTerminate, when set, answers a terminate before it happens.
	beforeTerminate func(id string) error

	mu         sync.Mutex
	next       int
	byKey      map[string]string // idempotency key → sandbox id
	creates    map[string]int    // create calls per idempotency key
	requests   []gateway.CreateRequest
	live       map[string]bool
	maxLive    int
	terminates map[string]int  // terminate calls per sandbox id
	snapshots  map[string]bool // snapshot flag of the last terminate
}

func newFakeGateway() *fakeGateway {
	return &fakeGateway{
		byKey:      map[string]string{},
		creates:    map[string]int{},
		live:       map[string]bool{},
		terminates: map[string]int{},
		snapshots:  map[string]bool{},
	}
}

func (g *fakeGateway) Create(_ context.Context, key string, req gateway.CreateRequest) (string, error) {
	if g.beforeCreate != nil {
		if err := g.beforeCreate(key); err != nil {
			return "", err
		}
	}
	g.mu.Lock()
	g.creates[key]++
	g.requests = append(g.requests, req)
	id, ok := g.byKey[key]
	if !ok {
		g.next++
		id = "sb-" + strconv.Itoa(g.next)
		g.byKey[key] = id
		g.live[id] = true
		g.maxLive = max(g.maxLive, len(g.live))
	}
	hook := g.afterCreate
	g.mu.Unlock()
	if hook != nil {
		if err := hook(key); err != nil {
			return "", err
		}
	}
	return id, nil
}

func (g *fakeGateway) Terminate(_ context.Context, id string, snapshot bool) error {
	if g.beforeTerminate != nil {
		if err := g.beforeTerminate(id); err != nil {
			return err
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.terminates[id]++
	g.snapshots[id] = snapshot
	if !g.live[id] {
		return fmt.Errorf("fake: %w", &gateway.APIError{StatusCode: 404, Method: "POST", Path: "/v1/sandboxes/" + id + "/terminate", Message: "no such sandbox"})
	}
	delete(g.live, id)
	return nil
}

func (g *fakeGateway) sandboxes() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.byKey)
}

func (g *fakeGateway) liveCount() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.live)
}

// newPool returns a pool on a fresh database and its client.
func newPool(t testing.TB, gw Gateway, cfg Config) (*Pool, *redis.Client) {
	t.Helper()
	rdb, _ := redistest.New(t)
	p, err := New(rdb, gw, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p, rdb
}

// secondPool returns another Pool, over its own client, sharing p's
// database: another worker process.
func secondPool(t testing.TB, p *Pool, gw Gateway, cfg Config) *Pool {
	t.Helper()
	opt := p.rdb.(*redis.Client).Options()
	rdb := redis.NewClient(opt)
	t.Cleanup(func() { rdb.Close() })
	q, err := New(rdb, gw, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func mustAcquire(t testing.TB, p *Pool, task string, spec Spec) *Lease {
	t.Helper()
	l, err := p.Acquire(context.Background(), task, spec, "")
	if err != nil {
		t.Fatalf("Acquire(%q): %v", task, err)
	}
	return l
}

func mustRelease(t testing.TB, p *Pool, l *Lease, cwd string) {
	t.Helper()
	if err := p.Release(context.Background(), l, cwd); err != nil {
		t.Fatalf("Release(%q): %v", l.TaskID(), err)
	}
}

func mustGet(t testing.TB, p *Pool, task string) Record {
	t.Helper()
	rec, ok, err := p.Get(context.Background(), task)
	if err != nil || !ok {
		t.Fatalf("Get(%q) = _, %v, %v; want a record", task, ok, err)
	}
	return rec
}

func TestNewValidates(t *testing.T) {
	rdb, _ := redistest.New(t)
	gw := newFakeGateway()
	for _, tc := range []struct {
		name string
		rdb  redis.UniversalClient
		gw   Gateway
		cfg  Config
		want string
	}{
		{"nil redis", nil, gw, Config{}, "nil redis client"},
		{"nil gateway", rdb, nil, Config{}, "nil gateway"},
		{"short lease", rdb, gw, Config{LeaseTTL: time.Millisecond}, "lease TTL"},
		{"negative cap", rdb, gw, Config{MaxSandboxes: -1}, "max sandboxes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.rdb, tc.gw, tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v; want an error containing %q", err, tc.want)
			}
		})
	}
	p, err := New(rdb, gw, Config{})
	if err != nil {
		t.Fatal(err)
	}
	if p.cfg.Prefix != "boxq:" || p.cfg.LeaseTTL != 5*time.Second || p.cfg.AcquireWait != 2*time.Second {
		t.Fatalf("defaults: prefix %q, lease TTL %v, acquire wait %v", p.cfg.Prefix, p.cfg.LeaseTTL, p.cfg.AcquireWait)
	}
}

func TestAcquireCreatesOnceThenReuses(t *testing.T) {
	ctx := context.Background()
	gw := newFakeGateway()
	now := time.UnixMilli(1_700_000_000_000)
	p, rdb := newPool(t, gw, Config{Prefix: "t:", Now: func() time.Time { return now }, NewKey: func() string { return "key-1" }})

	l := mustAcquire(t, p, "task-a", Spec{Image: "alpine", Persistent: true})
	wantSpec := Spec{
		Image: "alpine", CPU: gateway.DefaultCPU, MemoryMiB: gateway.DefaultMemoryMiB, Persistent: true,
		Cwd: gateway.DefaultCwd, TimeoutMs: gateway.DefaultTimeoutMs, IdleTimeoutMs: gateway.DefaultIdleTimeoutMs,
	}
	if diff := cmp.Diff(wantSpec, l.Spec()); diff != "" {
		t.Errorf("Lease.Spec() (-want +got):\n%s", diff)
	}
	if !l.Created() || l.Recreated() || l.SandboxID() != "sb-1" || l.Generation() != 1 || l.Cwd() != "" || l.TaskID() != "task-a" {
		t.Errorf("first lease: created %v, recreated %v, sandbox %q, gen %d, cwd %q, task %q; want true, false, sb-1, 1, \"\", task-a",
			l.Created(), l.Recreated(), l.SandboxID(), l.Generation(), l.Cwd(), l.TaskID())
	}
	wantReq := []gateway.CreateRequest{{
		Image: "alpine", Cwd: "/root", CPU: 1, MemoryMiB: 5120, TimeoutMs: 3_600_000, IdleTimeoutMs: 300_000,
		PersistentFilesystem: true, LogicalKey: "task-a",
	}}
	if diff := cmp.Diff(wantReq, gw.requests); diff != "" {
		t.Errorf("create requests (-want +got):\n%s", diff)
	}
	now = now.Add(time.Second)
	mustRelease(t, p, l, "/root/src")

	want := Record{
		TaskID: "task-a", SandboxID: "sb-1", Generation: 1, Cwd: "/root/src", Spec: wantSpec,
		IdempotencyKey: "key-1", CreatedAt: time.UnixMilli(1_700_000_000_000), LastUsed: now,
	}
	if diff := cmp.Diff(want, mustGet(t, p, "task-a")); diff != "" {
		t.Errorf("record after release (-want +got):\n%s", diff)
	}
	if score, err := rdb.ZScore(ctx, "t:sandboxes", "task-a").Result(); err != nil || int64(score) != now.UnixMilli() {
		t.Errorf("index score = %v, %v; want %d", score, err, now.UnixMilli())
	}

	// The second acquire reuses the sandbox and sees the cwd, whatever spec
	// it asks for; a release with "" keeps the cwd.
	l2 := mustAcquire(t, p, "task-a", Spec{Image: "other"})
	if l2.Created() || l2.SandboxID() != "sb-1" || l2.Cwd() != "/root/src" || l2.Spec().Image != "alpine" || l2.Token() <= l.Token() {
		t.Errorf("second lease: created %v, sandbox %q, cwd %q, image %q, token %d after %d",
			l2.Created(), l2.SandboxID(), l2.Cwd(), l2.Spec().Image, l2.Token(), l.Token())
	}
	mustRelease(t, p, l2, "")
	if got := mustGet(t, p, "task-a").Cwd; got != "/root/src" {
		t.Errorf("cwd after release with \"\" = %q; want /root/src", got)
	}
	if n, err := p.Live(ctx); err != nil || n != 1 {
		t.Errorf("Live = %d, %v; want 1", n, err)
	}
	if len(gw.requests) != 1 {
		t.Errorf("%d creates; want 1", len(gw.requests))
	}
	if _, ok, err := p.Get(ctx, "task-b"); ok || err != nil {
		t.Errorf("Get of an unknown task = _, %v, %v; want false, nil", ok, err)
	}
}

func TestAcquireRejectsBadInput(t *testing.T) {
	p, _ := newPool(t, newFakeGateway(), Config{})
	if _, err := p.Acquire(context.Background(), "", Spec{}, ""); err == nil {
		t.Error("Acquire with an empty task id succeeded")
	}
	if _, err := p.Acquire(context.Background(), "t", Spec{MemoryMiB: -1}, ""); err == nil {
		t.Error("Acquire with a negative memory size succeeded")
	}
}

// TestAcquireExclusive races many holders of one task, in one Pool and in
// two (two workers), and checks that they are never inside together.
func TestAcquireExclusive(t *testing.T) {
	for _, pools := range []int{1, 2} {
		t.Run(fmt.Sprintf("pools=%d", pools), func(t *testing.T) {
			gw := newFakeGateway()
			cfg := Config{AcquireWait: 20 * time.Second}
			p, _ := newPool(t, gw, cfg)
			ps := []*Pool{p}
			if pools == 2 {
				ps = append(ps, secondPool(t, p, gw, cfg))
			}
			const workers, iterations = 8, 40
			var inside, entered atomic.Int64
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := range workers {
				pool := ps[w%len(ps)]
				wg.Go(func() {
					ctx := context.Background()
					for range iterations {
						l, err := pool.Acquire(ctx, "task", Spec{}, "")
						if err != nil {
							errs <- err
							return
						}
						if n := inside.Add(1); n != 1 {
							errs <- fmt.Errorf("%d holders inside at once", n)
						}
						entered.Add(1)
						inside.Add(-1)
						if err := pool.Release(ctx, l, "/w"+strconv.Itoa(w)); err != nil {
							errs <- err
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			if got := entered.Load(); got != workers*iterations {
				t.Errorf("%d entries; want %d", got, workers*iterations)
			}
			if n := gw.sandboxes(); n != 1 {
				t.Errorf("%d sandboxes created; want 1", n)
			}
		})
	}
}

// TestReleaseRidesOutRedisRestart: a holder releases while Redis is down.
// The release must land once Redis is back, rather than fail and leave the
// task's lease taken until its TTL lapses (a minute here), holding up the
// task's next command (found by reliability.TestRedisRestart).
func TestReleaseRidesOutRedisRestart(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t, "--appendonly", "yes", "--appendfsync", "always")
	rdb, _ := srv.New(t)
	p, err := New(rdb, newFakeGateway(), Config{LeaseTTL: time.Minute, AcquireWait: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	l := mustAcquire(t, p, "task", Spec{})
	if err := srv.Kill(); err != nil {
		t.Fatal(err)
	}
	released := make(chan error, 1)
	go func() { released <- p.Release(context.Background(), l, "/work") }()
	// Down for longer than one try's own timeout (and go-redis's retries).
	select {
	case err := <-released:
		t.Fatalf("Release returned %v while Redis was down", err)
	case <-time.After(cleanupTimeout + time.Second):
	}
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-released:
		if err != nil {
			t.Fatalf("Release after Redis came back: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Release still waiting a minute after Redis came back")
	}
	// The lease is free now, long before its TTL, and the cwd was kept.
	next, err := p.Acquire(context.Background(), "task", Spec{}, "")
	if err != nil {
		t.Fatalf("Acquire after the release: %v", err)
	}
	if next.Cwd() != "/work" || next.SandboxID() != l.SandboxID() {
		t.Errorf("next lease: cwd %q, sandbox %q; want /work, %q", next.Cwd(), next.SandboxID(), l.SandboxID())
	}
	mustRelease(t, p, next, "")
}

func TestLeaseExpiresAfterCrash(t *testing.T) {
	gw := newFakeGateway()
	cfg := Config{LeaseTTL: 200 * time.Millisecond, AcquireWait: 5 * time.Second}
	a, _ := newPool(t, gw, cfg)
	b := secondPool(t, a, gw, cfg)

	crashed := mustAcquire(t, a, "task", Spec{})
	crashed.stop() // the holder dies: no more renewals, no release

	start := time.Now()
	l := mustAcquire(t, b, "task", Spec{})
	if waited := time.Since(start); waited > 4*time.Second { // AcquireWait is 5 s
		t.Errorf("took %v to get a crashed holder's lease with a TTL of %v", waited, cfg.LeaseTTL)
	}
	if l.Token() <= crashed.Token() || l.SandboxID() != crashed.SandboxID() {
		t.Errorf("new lease: token %d, sandbox %q; want a token above %d, sandbox %q", l.Token(), l.SandboxID(), crashed.Token(), crashed.SandboxID())
	}
	if err := a.Release(context.Background(), crashed, "/stale"); !errors.Is(err, ErrStaleLease) {
		t.Errorf("stale holder's Release: %v; want ErrStaleLease", err)
	}
	if err := a.Recreate(context.Background(), crashed); !errors.Is(err, ErrStaleLease) {
		t.Errorf("stale holder's Recreate: %v; want ErrStaleLease", err)
	}
	mustRelease(t, b, l, "/fresh")
	if got := mustGet(t, a, "task").Cwd; got != "/fresh" {
		t.Errorf("cwd = %q; want /fresh (the stale write refused)", got)
	}
}

func TestLeaseRenewedWhileHeld(t *testing.T) {
	gw := newFakeGateway()
	p, _ := newPool(t, gw, Config{LeaseTTL: 150 * time.Millisecond, AcquireWait: 600 * time.Millisecond})
	l := mustAcquire(t, p, "task", Spec{})
	// Four TTLs of trying: only renewals keep the lease this long.
	if _, err := p.Acquire(context.Background(), "task", Spec{}, ""); !errors.Is(err, ErrBusy) {
		t.Fatalf("Acquire of a held task: %v; want ErrBusy", err)
	}
	select {
	case <-l.Lost():
		t.Fatal("lease reported lost while renewed")
	default:
	}
	mustRelease(t, p, l, "")
}

func TestLeaseLost(t *testing.T) {
	gw := newFakeGateway()
	p, rdb := newPool(t, gw, Config{LeaseTTL: 150 * time.Millisecond})
	l := mustAcquire(t, p, "task", Spec{})
	// Another holder has the lease (it lapsed during a long stall, and was
	// taken): a lease that merely lapsed is taken back
	// (TestLapsedLeaseIsTakenBack).
	if err := rdb.Set(context.Background(), p.leaseKey("task"), "999999", 0).Err(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-l.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("lease loss not reported")
	}
	if err := p.Release(context.Background(), l, "/x"); !errors.Is(err, ErrStaleLease) {
		t.Fatalf("Release of a lost lease: %v; want ErrStaleLease", err)
	}
}

func TestReleaseTwiceAndCancelled(t *testing.T) {
	p, _ := newPool(t, newFakeGateway(), Config{})
	l := mustAcquire(t, p, "task", Spec{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := p.Release(ctx, l, "/done"); err != nil {
		t.Fatalf("Release with a cancelled context: %v", err)
	}
	if err := p.Release(ctx, l, "/again"); err != nil {
		t.Fatalf("second Release: %v", err)
	}
	if got := mustGet(t, p, "task").Cwd; got != "/done" {
		t.Fatalf("cwd = %q; want /done", got)
	}
	if err := p.Release(ctx, nil, ""); err != nil {
		t.Fatalf("Release(nil): %v", err)
	}
	// The lease is free: an attempt that does not wait gets it.
	q := secondPool(t, p, newFakeGateway(), Config{AcquireWait: -1})
	mustRelease(t, q, mustAcquire(t, q, "task", Spec{}), "")
}

// TestCreateCrashKeepsOneSandbox: the create reached the gateway, but its
// answer never made it into the record (here: the reply was lost; a crash
// leaves the same state). The retry uses the same idempotency key and gets
// the same sandbox.
func TestCreateCrashKeepsOneSandbox(t *testing.T) {
	gw := newFakeGateway()
	var calls atomic.Int64
	gw.afterCreate = func(string) error {
		if calls.Add(1) == 1 {
			return errors.New("connection reset")
		}
		return nil
	}
	keys := 0
	p, _ := newPool(t, gw, Config{NewKey: func() string { keys++; return "key-" + strconv.Itoa(keys) }})

	if _, err := p.Acquire(context.Background(), "task", Spec{}, ""); err == nil || !strings.Contains(err.Error(), "connection reset") {
		t.Fatalf("Acquire with a failing create: %v; want the create's error", err)
	}
	rec := mustGet(t, p, "task")
	if rec.SandboxID != "" || rec.IdempotencyKey != "key-1" {
		t.Fatalf("record after the failed create: sandbox %q, key %q; want \"\", key-1", rec.SandboxID, rec.IdempotencyKey)
	}

	// Another worker retries; no wait: the failed attempt freed the lease.
	q := secondPool(t, p, gw, Config{AcquireWait: -1, NewKey: func() string { return "other-key" }})
	l := mustAcquire(t, q, "task", Spec{})
	if !l.Created() || l.SandboxID() != "sb-1" {
		t.Fatalf("retry: created %v, sandbox %q; want true, sb-1", l.Created(), l.SandboxID())
	}
	mustRelease(t, q, l, "")
	if n := gw.sandboxes(); n != 1 {
		t.Errorf("%d distinct sandboxes; want 1", n)
	}
	if diff := cmp.Diff(map[string]int{"key-1": 2}, gw.creates); diff != "" {
		t.Errorf("creates per key (-want +got):\n%s", diff)
	}
}

func TestRecreate(t *testing.T) {
	gw := newFakeGateway()
	keys := 0
	p, _ := newPool(t, gw, Config{NewKey: func() string { keys++; return "key-" + strconv.Itoa(keys) }})
	mustRelease(t, p, mustAcquire(t, p, "task", Spec{Cwd: "/home"}), "/home/deep")

	l := mustAcquire(t, p, "task", Spec{})
	if err := p.Recreate(context.Background(), l); err != nil {
		t.Fatal(err)
	}
	if !l.Recreated() || l.Generation() != 2 || l.Cwd() != "" || l.SandboxID() != "sb-2" {
		t.Errorf("after Recreate: recreated %v, gen %d, cwd %q, sandbox %q; want true, 2, /home, sb-2",
			l.Recreated(), l.Generation(), l.Cwd(), l.SandboxID())
	}
	mustRelease(t, p, l, "")
	rec := mustGet(t, p, "task")
	if rec.Generation != 2 || rec.IdempotencyKey != "key-2" || rec.SandboxID != "sb-2" || rec.Cwd != "" {
		t.Errorf("record: gen %d, key %q, sandbox %q, cwd %q; want 2, key-2, sb-2, \"\" (the default)", rec.Generation, rec.IdempotencyKey, rec.SandboxID, rec.Cwd)
	}

	// A failed recreate leaves a pending create under the new key, which
	// the next Acquire finishes.
	gw.afterCreate = func(key string) error {
		if key == "key-3" && gw.creates[key] == 1 {
			return errors.New("gateway down")
		}
		return nil
	}
	l = mustAcquire(t, p, "task", Spec{})
	if err := p.Recreate(context.Background(), l); err == nil {
		t.Fatal("Recreate with a failing create succeeded")
	}
	mustRelease(t, p, l, "")
	l = mustAcquire(t, p, "task", Spec{})
	if !l.Created() || l.Generation() != 3 || l.SandboxID() != "sb-3" {
		t.Errorf("after a failed recreate: created %v, gen %d, sandbox %q; want true, 3, sb-3", l.Created(), l.Generation(), l.SandboxID())
	}
	mustRelease(t, p, l, "")
}

func TestTerminate(t *testing.T) {
	ctx := context.Background()
	t.Run("persistent", func(t *testing.T) {
		gw := newFakeGateway()
		p, _ := newPool(t, gw, Config{})
		mustRelease(t, p, mustAcquire(t, p, "task", Spec{Persistent: true}), "")
		for i := range 2 { // the second one finds no record
			if err := p.Terminate(ctx, "task"); err != nil {
				t.Fatalf("Terminate #%d: %v", i+1, err)
			}
		}
		if gw.terminates["sb-1"] != 1 || !gw.snapshots["sb-1"] {
			t.Errorf("gateway terminates: %v, snapshot %v; want one, with a snapshot", gw.terminates, gw.snapshots)
		}
		if _, ok, _ := p.Get(ctx, "task"); ok {
			t.Error("record still there")
		}
		if n, _ := p.Live(ctx); n != 0 {
			t.Errorf("Live = %d; want 0", n)
		}
		// A new Acquire makes a new sandbox.
		if l := mustAcquire(t, p, "task", Spec{}); l.SandboxID() != "sb-2" || !l.Created() {
			t.Errorf("after terminate: sandbox %q, created %v", l.SandboxID(), l.Created())
		} else {
			mustRelease(t, p, l, "")
		}
	})
	t.Run("gone at the gateway", func(t *testing.T) {
		gw := newFakeGateway()
		p, _ := newPool(t, gw, Config{})
		mustRelease(t, p, mustAcquire(t, p, "task", Spec{}), "")
		delete(gw.live, "sb-1") // reaped by the gateway's idle timeout
		if err := p.Terminate(ctx, "task"); err != nil {
			t.Fatalf("Terminate of a sandbox the gateway does not know: %v", err)
		}
		if _, ok, _ := p.Get(ctx, "task"); ok {
			t.Error("record still there")
		}
	})
	t.Run("gateway error", func(t *testing.T) {
		gw := newFakeGateway()
		p, _ := newPool(t, gw, Config{AcquireWait: -1})
		mustRelease(t, p, mustAcquire(t, p, "task", Spec{}), "")
		gw.beforeTerminate = func(string) error { return &gateway.APIError{StatusCode: 502, Message: "bad gateway"} }
		if err := p.Terminate(ctx, "task"); err == nil {
			t.Fatal("Terminate with a failing gateway succeeded")
		}
		// The record stays, and its lease is free at once.
		mustRelease(t, p, mustAcquire(t, p, "task", Spec{}), "")
		gw.beforeTerminate = nil
		if err := p.Terminate(ctx, "task"); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("busy", func(t *testing.T) {
		gw := newFakeGateway()
		p, _ := newPool(t, gw, Config{AcquireWait: 50 * time.Millisecond})
		l := mustAcquire(t, p, "task", Spec{})
		if err := p.Terminate(ctx, "task"); !errors.Is(err, ErrBusy) {
			t.Fatalf("Terminate of a held task: %v; want ErrBusy", err)
		}
		mustRelease(t, p, l, "")
		if err := p.Terminate(ctx, "task"); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("pending create", func(t *testing.T) {
		gw := newFakeGateway()
		gw.afterCreate = func(string) error { return errors.New("lost reply") }
		p, _ := newPool(t, gw, Config{})
		if _, err := p.Acquire(ctx, "task", Spec{}, ""); err == nil {
			t.Fatal("Acquire succeeded")
		}
		if err := p.Terminate(ctx, "task"); err != nil {
			t.Fatal(err)
		}
		if n, _ := p.Live(ctx); n != 0 {
			t.Errorf("Live = %d; want 0", n)
		}
	})
}

func TestAcquireContextCancelledWhileWaiting(t *testing.T) {
	p, _ := newPool(t, newFakeGateway(), Config{AcquireWait: time.Minute})
	l := mustAcquire(t, p, "task", Spec{})
	defer mustRelease(t, p, l, "")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := p.Acquire(ctx, "task", Spec{}, "")
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrBusy) {
		t.Fatalf("Acquire with an expiring context: %v; want context.DeadlineExceeded", err)
	}
	if waited := time.Since(start); waited > time.Second {
		t.Fatalf("Acquire returned %v after its context ended", waited)
	}
}

func TestCapacity(t *testing.T) {
	const limit = 5
	t.Run("at capacity", func(t *testing.T) {
		p, _ := newPool(t, newFakeGateway(), Config{MaxSandboxes: limit, AcquireWait: 50 * time.Millisecond})
		for i := range limit {
			mustRelease(t, p, mustAcquire(t, p, "task-"+strconv.Itoa(i), Spec{}), "")
		}
		_, err := p.Acquire(context.Background(), "one-more", Spec{}, "")
		if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "pool at capacity") {
			t.Fatalf("Acquire beyond the cap: %v; want ErrBusy, pool at capacity", err)
		}
		// Tasks that have a sandbox are not held back.
		mustRelease(t, p, mustAcquire(t, p, "task-0", Spec{}), "")
	})
	t.Run("50 concurrent tasks", func(t *testing.T) {
		gw := newFakeGateway()
		cfg := Config{MaxSandboxes: limit, AcquireWait: 20 * time.Second}
		p, _ := newPool(t, gw, cfg)
		q := secondPool(t, p, gw, cfg)
		var wg sync.WaitGroup
		var maxLive atomic.Int64
		errs := make(chan error, 50)
		for i := range 50 {
			pool := []*Pool{p, q}[i%2]
			wg.Go(func() {
				ctx := context.Background()
				task := "task-" + strconv.Itoa(i)
				l, err := pool.Acquire(ctx, task, Spec{}, "")
				if err != nil {
					errs <- err
					return
				}
				n, err := pool.Live(ctx)
				if err != nil {
					errs <- err
				}
				for {
					m := maxLive.Load()
					if n <= m || maxLive.CompareAndSwap(m, n) {
						break
					}
				}
				if err := pool.Release(ctx, l, ""); err != nil {
					errs <- err
				}
				if err := pool.Terminate(ctx, task); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if m := maxLive.Load(); m > limit || m == 0 {
			t.Errorf("max live seen by holders = %d; want 1..%d", m, limit)
		}
		if gw.maxLive > limit {
			t.Errorf("max live at the gateway = %d; want ≤ %d", gw.maxLive, limit)
		}
		if n := gw.sandboxes(); n != 50 {
			t.Errorf("%d sandboxes created; want 50", n)
		}
		if n := gw.liveCount(); n != 0 {
			t.Errorf("%d sandboxes left; want 0", n)
		}
	})
}

// seed writes n records straight to Redis (as n earlier acquires would),
// sandbox "sb-<task>", last used at used(i). It is fast enough for 100,000.
func seed(tb testing.TB, p *Pool, rdb *redis.Client, from, n int, used func(i int) time.Time) {
	tb.Helper()
	ctx := context.Background()
	const batch = 2000
	for start := from; start < from+n; start += batch {
		end := min(start+batch, from+n)
		pipe := rdb.Pipeline()
		members := make([]redis.Z, 0, end-start)
		for i := start; i < end; i++ {
			task := seedTask(i)
			ms := used(i).UnixMilli()
			pipe.HSet(ctx, p.recordKey(task), "sandbox_id", "sb-"+task, "gen", 1, "persistent", 1, "used", ms, "key", "k-"+task)
			members = append(members, redis.Z{Score: float64(ms), Member: task})
		}
		pipe.ZAdd(ctx, p.indexKey, members...)
		if _, err := pipe.Exec(ctx); err != nil {
			tb.Fatal(err)
		}
	}
}

func seedTask(i int) string { return fmt.Sprintf("task-%06d", i) }

// liveGateway returns a fake gateway that knows the seeded sandboxes.
func liveGateway(from, n int) *fakeGateway {
	gw := newFakeGateway()
	for i := from; i < from+n; i++ {
		gw.live["sb-"+seedTask(i)] = true
	}
	return gw
}

func TestReapIdle(t *testing.T) {
	ctx := context.Background()
	const total, expired = 100_000, 101 // one of them leased
	gw := liveGateway(0, total)
	p, rdb := newPool(t, gw, Config{})
	now := time.Now()
	// Spread the expired ones over the task ids, to show the index, not
	// the ids, finds them.
	isExpired := func(i int) bool { return i%(total/expired) == 0 && i/(total/expired) < expired }
	seed(t, p, rdb, 0, total, func(i int) time.Time {
		if isExpired(i) {
			return now.Add(-time.Hour + time.Duration(i)*time.Millisecond)
		}
		return now.Add(-time.Minute)
	})
	busy := seedTask(total / expired * 7)
	// A holder that has run one command for an hour: its record is old,
	// but it is in use.
	if err := rdb.Set(ctx, p.leaseKey(busy), 1, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}

	reaped, err := p.ReapIdle(ctx, now, 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if reaped != expired-1 {
		t.Errorf("reaped %d; want %d", reaped, expired-1)
	}
	for i := range total {
		id := "sb-" + seedTask(i)
		want := 0
		if isExpired(i) && seedTask(i) != busy {
			want = 1
		}
		if got := gw.terminates[id]; got != want {
			t.Fatalf("sandbox %s terminated %d times; want %d", id, got, want)
		}
		if want == 1 && !gw.snapshots[id] {
			t.Fatalf("sandbox %s terminated without a snapshot; it is persistent", id)
		}
	}
	if n, _ := p.Live(ctx); n != total-expired+1 {
		t.Errorf("Live = %d; want %d", n, total-expired+1)
	}
	if _, ok, _ := p.Get(ctx, busy); !ok {
		t.Errorf("the leased task's record was reaped")
	}
	// Nothing left to do; the busy one is still skipped.
	if reaped, err := p.ReapIdle(ctx, now, 5*time.Minute); reaped != 0 || err != nil {
		t.Errorf("second ReapIdle = %d, %v; want 0, nil", reaped, err)
	}
}

func TestReapIdleConcurrent(t *testing.T) {
	ctx := context.Background()
	const n = 2000
	gw := liveGateway(0, n)
	p, rdb := newPool(t, gw, Config{})
	q := secondPool(t, p, gw, Config{})
	now := time.Now()
	seed(t, p, rdb, 0, n, func(i int) time.Time { return now.Add(-time.Hour) })
	// Interleave the reapers' terminations.
	gw.beforeTerminate = func(string) error {
		runtime.Gosched()
		return nil
	}

	var wg sync.WaitGroup
	var counts [2]int
	var errs [2]error
	for i, pool := range []*Pool{p, q} {
		wg.Go(func() { counts[i], errs[i] = pool.ReapIdle(ctx, now, time.Minute) })
	}
	wg.Wait()
	if errs[0] != nil || errs[1] != nil {
		t.Fatal(errs)
	}
	t.Logf("reaped %v", counts)
	if counts[0]+counts[1] != n {
		t.Errorf("reaped %d + %d; want %d in all", counts[0], counts[1], n)
	}
	for id, c := range gw.terminates {
		if c != 1 {
			t.Errorf("sandbox %s terminated %d times", id, c)
		}
	}
	if len(gw.terminates) != n {
		t.Errorf("%d sandboxes terminated; want %d", len(gw.terminates), n)
	}
	if l, _ := p.Live(ctx); l != 0 {
		t.Errorf("Live = %d; want 0", l)
	}
}

func TestReapIdleFailures(t *testing.T) {
	ctx := context.Background()
	gw := liveGateway(0, 10)
	p, rdb := newPool(t, gw, Config{})
	now := time.Now()
	seed(t, p, rdb, 0, 10, func(int) time.Time { return now.Add(-time.Hour) })
	gw.beforeTerminate = func(id string) error {
		if id == "sb-"+seedTask(3) {
			return &gateway.APIError{StatusCode: 503, Message: "unavailable"}
		}
		return nil
	}
	reaped, err := p.ReapIdle(ctx, now, time.Minute)
	if reaped != 9 || err == nil || !strings.Contains(err.Error(), "1 terminations failed") {
		t.Fatalf("ReapIdle = %d, %v; want 9 and one failure", reaped, err)
	}
	// The failed one stays, not marked used, and its claim is freed.
	gw.beforeTerminate = nil
	if reaped, err := p.ReapIdle(ctx, now, time.Minute); reaped != 1 || err != nil {
		t.Fatalf("second ReapIdle = %d, %v; want 1, nil", reaped, err)
	}
	if _, err := p.ReapIdle(ctx, now, 0); err == nil {
		t.Error("ReapIdle with a zero TTL succeeded")
	}
}

// roundTrips counts the commands and pipelines a client sends.
type roundTrips struct{ n atomic.Int64 }

func (h *roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.n.Add(1)
		return next(ctx, cmd)
	}
}

func (h *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.n.Add(1)
		return next(ctx, cmds)
	}
}

// TestRoundTrips pins the cost of the common path: one round trip to
// acquire a task's existing sandbox, one to release it.
func TestRoundTrips(t *testing.T) {
	p, _ := newPool(t, newFakeGateway(), Config{})
	var rt roundTrips
	p.rdb.AddHook(&rt)
	// The first uses load the scripts into Redis.
	mustRelease(t, p, mustAcquire(t, p, "task", Spec{}), "")
	mustRelease(t, p, mustAcquire(t, p, "task", Spec{}), "")

	rt.n.Store(0)
	l := mustAcquire(t, p, "task", Spec{})
	if n := rt.n.Load(); n != 1 {
		t.Errorf("Acquire took %d round trips; want 1", n)
	}
	rt.n.Store(0)
	mustRelease(t, p, l, "/tmp")
	if n := rt.n.Load(); n != 1 {
		t.Errorf("Release took %d round trips; want 1", n)
	}
}

func TestInFlightExecIsHandedToTheNextHolder(t *testing.T) {
	ctx := context.Background()
	p, _ := newPool(t, newFakeGateway(), Config{})
	l1, err := p.Acquire(ctx, "task", Spec{}, "exec-1")
	if err != nil {
		t.Fatal(err)
	}
	if got := l1.PrevExecID(); got != "" {
		t.Errorf("first lease PrevExecID = %q, want none", got)
	}
	// The holder stops waiting for exec-1, which goes on running.
	if err := p.Abandon(ctx, l1, 0); err != nil {
		t.Fatalf("Abandon: %v", err)
	}
	if err := p.Release(ctx, l1, "/x"); err != nil {
		t.Errorf("Release after Abandon = %v, want a no-op", err)
	}
	l2, err := p.Acquire(ctx, "task", Spec{}, "exec-2")
	if err != nil {
		t.Fatal(err)
	}
	if got := l2.PrevExecID(); got != "exec-1" {
		t.Errorf("PrevExecID after Abandon = %q, want exec-1", got)
	}
	mustRelease(t, p, l2, "")
	l3, err := p.Acquire(ctx, "task", Spec{}, "exec-3")
	if err != nil {
		t.Fatal(err)
	}
	if got := l3.PrevExecID(); got != "" {
		t.Errorf("PrevExecID after a Release = %q, want none", got)
	}
	if l3.Cwd() != "" {
		t.Errorf("Abandon stored cwd %q; it must change nothing", l3.Cwd())
	}
	mustRelease(t, p, l3, "")
}

func TestInFlightExecAfterCrash(t *testing.T) {
	ctx := context.Background()
	cfg := Config{LeaseTTL: 300 * time.Millisecond, AcquireWait: 5 * time.Second}
	gw := newFakeGateway()
	a, _ := newPool(t, gw, cfg)
	b := secondPool(t, a, gw, cfg)
	crashed, err := a.Acquire(ctx, "task", Spec{}, "exec-a")
	if err != nil {
		t.Fatal(err)
	}
	crashed.stop() // the process died: no renewal, no release
	l, err := b.Acquire(ctx, "task", Spec{}, "exec-b")
	if err != nil {
		t.Fatal(err)
	}
	if got := l.PrevExecID(); got != "exec-a" {
		t.Errorf("PrevExecID after a crash = %q, want exec-a", got)
	}
	mustRelease(t, b, l, "")
}

// TestReapSparesUncollectedExec: a holder that vanished with an exec
// running (a worker SIGKILLed, or stopped with Abandon) leaves its job to
// come back and collect the exec in the same sandbox. Another holder of the
// task using and releasing the sandbox meanwhile must not make the reaper
// terminate it: the job would then run its command again in a new sandbox
// (found by reliability.TestWorkerSIGKILL).
func TestReapSparesUncollectedExec(t *testing.T) {
	ctx := context.Background()
	cfg := Config{LeaseTTL: 200 * time.Millisecond, AcquireWait: 5 * time.Second, InFlightGrace: time.Hour}
	gw := newFakeGateway()
	a, _ := newPool(t, gw, cfg)
	b := secondPool(t, a, gw, cfg)
	crashed, err := a.Acquire(ctx, "task", Spec{}, "exec-a")
	if err != nil {
		t.Fatal(err)
	}
	sandbox := crashed.SandboxID()
	crashed.stop() // the holder died: no renewal, no release
	other, err := b.Acquire(ctx, "task", Spec{}, "exec-b")
	if err != nil {
		t.Fatal(err)
	}
	mustRelease(t, b, other, "")

	later := time.Now().Add(time.Minute)
	if n, err := b.ReapIdle(ctx, later, time.Second); n != 0 || err != nil {
		t.Fatalf("ReapIdle with exec-a uncollected = %d, %v; want 0, nil", n, err)
	}
	if gw.terminates[sandbox] != 0 {
		t.Fatalf("sandbox %s terminated while exec-a was not collected", sandbox)
	}
	// Past the grace the sandbox is reaped all the same.
	if n, err := b.ReapIdle(ctx, time.Now().Add(2*time.Hour), time.Second); n != 1 || err != nil {
		t.Fatalf("ReapIdle past the grace = %d, %v; want 1, nil", n, err)
	}

	// The job that comes back and collects its exec clears the mark.
	back, err := a.Acquire(ctx, "task2", Spec{}, "exec-c")
	if err != nil {
		t.Fatal(err)
	}
	back.stop()
	again, err := b.Acquire(ctx, "task2", Spec{}, "exec-c")
	if err != nil {
		t.Fatal(err)
	}
	if again.PrevExecID() != "exec-c" {
		t.Errorf("PrevExecID of the re-delivery = %q, want exec-c", again.PrevExecID())
	}
	mustRelease(t, b, again, "")
	if n, err := b.ReapIdle(ctx, later, time.Second); n != 1 || err != nil {
		t.Fatalf("ReapIdle after the exec was collected = %d, %v; want 1, nil", n, err)
	}
}

// TestYieldHandsOnThePreviousExec: a holder that gives up while it waits
// for the previous holder's exec to end (its own never started) must leave
// that exec for the next holder to wait for; otherwise the next command
// of the task would start while it still runs (found by
// reliability.TestWorkerSIGTERM, a second shutdown hitting the waiter).
func TestYieldHandsOnThePreviousExec(t *testing.T) {
	ctx := context.Background()
	p, rdb := newPool(t, newFakeGateway(), Config{})
	a, err := p.Acquire(ctx, "task", Spec{}, "exec-a")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Abandon(ctx, a, 0); err != nil { // exec-a goes on running
		t.Fatal(err)
	}
	b, err := p.Acquire(ctx, "task", Spec{}, "exec-b")
	if err != nil {
		t.Fatal(err)
	}
	if b.PrevExecID() != "exec-a" {
		t.Fatalf("PrevExecID = %q, want exec-a", b.PrevExecID())
	}
	if err := p.Yield(ctx, b); err != nil { // gave up waiting; exec-b never started
		t.Fatal(err)
	}
	c, err := p.Acquire(ctx, "task", Spec{}, "exec-c")
	if err != nil {
		t.Fatal(err)
	}
	if c.PrevExecID() != "exec-a" {
		t.Errorf("PrevExecID after a Yield = %q, want exec-a, still to be waited for", c.PrevExecID())
	}
	marks, err := rdb.HKeys(ctx, p.recordKey("task")).Result()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(marks, "inflight:exec-a") || slices.Contains(marks, "inflight:exec-b") {
		t.Errorf("record fields %v: want exec-a marked in flight, exec-b not", marks)
	}
	mustRelease(t, p, c, "")
	if err := p.Yield(ctx, c); err != nil {
		t.Errorf("Yield after Release = %v, want a no-op", err)
	}
}

// TestPrevExecIDsAfterACrashedWaiter: a holder that dies while it waits
// for an earlier exec has already put its own exec id in the record; the
// next holder must still learn of the earlier exec, which may be running.
func TestPrevExecIDsAfterACrashedWaiter(t *testing.T) {
	ctx := context.Background()
	cfg := Config{LeaseTTL: 200 * time.Millisecond, AcquireWait: 5 * time.Second}
	p, _ := newPool(t, newFakeGateway(), cfg)
	a, err := p.Acquire(ctx, "task", Spec{}, "exec-a")
	if err != nil {
		t.Fatal(err)
	}
	a.stop() // died with exec-a running
	b, err := p.Acquire(ctx, "task", Spec{}, "exec-b")
	if err != nil {
		t.Fatal(err)
	}
	b.stop() // died while waiting for exec-a; exec-b never started
	c, err := p.Acquire(ctx, "task", Spec{}, "exec-c")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.PrevExecIDs(); !slices.Contains(got, "exec-a") || !slices.Contains(got, "exec-b") || slices.Contains(got, "exec-c") {
		t.Errorf("PrevExecIDs = %v, want exec-a and exec-b, not the holder's own", got)
	}
	mustRelease(t, p, c, "")
	// A re-delivery of exec-a's job re-attaches: its own exec is not one
	// to wait for.
	again, err := p.Acquire(ctx, "task", Spec{}, "exec-a")
	if err != nil {
		t.Fatal(err)
	}
	if got := again.PrevExecIDs(); slices.Contains(got, "exec-a") {
		t.Errorf("PrevExecIDs of exec-a's re-delivery = %v, want exec-a left out", got)
	}
	mustRelease(t, p, again, "")
}

func TestAcquireChecks(t *testing.T) {
	gw := newFakeGateway()
	p, rdb := newPool(t, gw, Config{AcquireWait: 100 * time.Millisecond})
	ctx := context.Background()
	const mark, flag, seq = "caller:mark", "caller:flag", "caller:seq"
	checks := []Check{
		{Key: mark, Field: "done"},
		{Key: flag},
		{Key: seq, Field: "head", Other: "me"},
	}
	take := func() error {
		l, err := p.AcquireFor(ctx, "task", Spec{}, Intent{Unless: checks})
		if err == nil {
			mustRelease(t, p, l, "")
		}
		return err
	}
	vetoedBy := func(err error) int {
		var v *VetoError
		if !errors.As(err, &v) || !errors.Is(err, ErrVetoed) {
			return -1
		}
		return v.Index
	}

	// No mark: taken.
	if err := take(); err != nil {
		t.Fatalf("no marks: %v", err)
	}
	// The sequence's head is "me", or the hash has no head: taken.
	rdb.HSet(ctx, seq, "head", "me")
	if err := take(); err != nil {
		t.Fatalf("head is me: %v", err)
	}
	rdb.HSet(ctx, seq, "head", "someone-else")
	if err := take(); vetoedBy(err) != 2 {
		t.Errorf("head is another: got %v, want a veto by check 2", err)
	}
	rdb.Set(ctx, flag, "1", 0)
	if err := take(); vetoedBy(err) != 1 {
		t.Errorf("flag set: got %v, want a veto by check 1 (the first that holds)", err)
	}
	rdb.HSet(ctx, mark, "done", "1")
	if err := take(); vetoedBy(err) != 0 {
		t.Errorf("mark set: got %v, want a veto by check 0", err)
	}
	// The lease was never left taken.
	if ttl := rdb.PTTL(ctx, p.leaseKey("task")).Val(); ttl > 0 {
		t.Errorf("lease left with TTL %v", ttl)
	}
	if _, err := p.AcquireFor(ctx, "task", Spec{}, Intent{Unless: []Check{{Key: seq, Other: "x"}}}); err == nil {
		t.Error("a check on a value without a field was accepted")
	}
}

// TestStamp: the take stamps the caller's hash with its token and the
// sandbox's key, and hands back what an earlier take stamped, so that a
// job knows whether, and in which sandbox, it may have started before.
func TestStamp(t *testing.T) {
	gw := newFakeGateway()
	p, rdb := newPool(t, gw, Config{})
	ctx := context.Background()
	const job = "caller:job"
	rdb.HSet(ctx, job, "state", "active")
	in := Intent{ExecID: "exec-1", Stamp: job}
	l, err := p.AcquireFor(ctx, "task", Spec{}, in)
	if err != nil {
		t.Fatal(err)
	}
	if l.StartedIn() != "" {
		t.Errorf("first take: StartedIn = %q, want none", l.StartedIn())
	}
	if got := rdb.HGet(ctx, job, "boxq_owner").Val(); got != strconv.FormatInt(l.Token(), 10) {
		t.Errorf("boxq_owner = %q, want the token %d", got, l.Token())
	}
	first := l.SandboxKey()
	if first == "" {
		t.Fatal("no sandbox key")
	}
	mustRelease(t, p, l, "")

	again, err := p.AcquireFor(ctx, "task", Spec{}, in)
	if err != nil {
		t.Fatal(err)
	}
	if again.StartedIn() != first || again.SandboxKey() != first {
		t.Errorf("second take: StartedIn %q, SandboxKey %q; want both %q", again.StartedIn(), again.SandboxKey(), first)
	}
	mustRelease(t, p, again, "")

	// A terminated sandbox: the next take is in a new one, and says where
	// the earlier one started.
	if err := p.Terminate(ctx, "task"); err != nil {
		t.Fatal(err)
	}
	third, err := p.AcquireFor(ctx, "task", Spec{}, in)
	if err != nil {
		t.Fatal(err)
	}
	if third.StartedIn() != first || third.SandboxKey() == first {
		t.Errorf("after terminate: StartedIn %q, SandboxKey %q; want %q and a new key", third.StartedIn(), third.SandboxKey(), first)
	}
	mustRelease(t, p, third, "")

	// A hash that is gone is not made again.
	rdb.Del(ctx, job)
	l, err = p.AcquireFor(ctx, "task", Spec{}, in)
	if err != nil {
		t.Fatal(err)
	}
	mustRelease(t, p, l, "")
	if n := rdb.Exists(ctx, job).Val(); n != 0 {
		t.Errorf("the stamp made the deleted hash again: %v", rdb.HGetAll(ctx, job).Val())
	}
}

// TestLapsedLeaseIsTakenBack: a holder that stalls past the TTL (a Redis
// outage, a pause) with nobody taking its lease meanwhile keeps it: the
// renewal takes it back and its release stores the cwd and clears its
// in-flight mark (issue 12, item 3: the cwd was dropped and the mark
// stayed for good).
func TestLapsedLeaseIsTakenBack(t *testing.T) {
	gw := newFakeGateway()
	p, rdb := newPool(t, gw, Config{LeaseTTL: 200 * time.Millisecond})
	ctx := context.Background()

	// The release of a lease that lapsed unnoticed.
	l, err := p.Acquire(ctx, "task", Spec{}, "exec-1")
	if err != nil {
		t.Fatal(err)
	}
	l.stop() // no renewal: the lease lapses as if Redis had been away
	waitFor(t, "the lease to lapse", func() bool { return rdb.Exists(ctx, p.leaseKey("task")).Val() == 0 })
	if err := p.Release(ctx, l, "/tmp"); err != nil {
		t.Fatalf("Release of a lapsed lease nobody took: %v", err)
	}
	rec, _, _ := p.Get(ctx, "task")
	if rec.Cwd != "/tmp" {
		t.Errorf("cwd = %q, want /tmp", rec.Cwd)
	}
	if marks := inflightMarks(t, rdb, p.recordKey("task")); len(marks) != 0 {
		t.Errorf("marks left: %v", marks)
	}
	if n := rdb.ZCard(ctx, p.inflightKey).Val(); n != 0 {
		t.Errorf("in-flight index has %d entries, want 0", n)
	}

	// The renewal takes a lapsed lease back.
	l, err = p.Acquire(ctx, "task", Spec{}, "exec-2")
	if err != nil {
		t.Fatal(err)
	}
	rdb.Del(ctx, p.leaseKey("task"))
	waitFor(t, "the renewal to take the lease back", func() bool {
		return rdb.Get(ctx, p.leaseKey("task")).Val() == strconv.FormatInt(l.Token(), 10)
	})
	select {
	case <-l.Lost():
		t.Fatal("lease reported lost though nobody took it")
	default:
	}
	mustRelease(t, p, l, "/var")

	// Taken by someone else meanwhile: lost, and the release is refused.
	l, err = p.Acquire(ctx, "task", Spec{}, "exec-3")
	if err != nil {
		t.Fatal(err)
	}
	l.stop()
	waitFor(t, "the lease to lapse", func() bool { return rdb.Exists(ctx, p.leaseKey("task")).Val() == 0 })
	other, err := p.Acquire(ctx, "task", Spec{}, "exec-4")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Release(ctx, l, "/wrong"); !errors.Is(err, ErrStaleLease) {
		t.Errorf("Release after another took the lease = %v, want ErrStaleLease", err)
	}
	mustRelease(t, p, other, "")
	if rec, _, _ := p.Get(ctx, "task"); rec.Cwd != "/var" {
		t.Errorf("cwd = %q, want /var (the stale release must change nothing)", rec.Cwd)
	}
}

// TestClaimOrphans: a holder that dies with an exec in flight is found
// once its lease lapses, by one rescuer, with its note; a live holder's
// exec is not.
func TestClaimOrphans(t *testing.T) {
	gw := newFakeGateway()
	cfg := Config{LeaseTTL: 200 * time.Millisecond}
	p, rdb := newPool(t, gw, cfg)
	q := secondPool(t, p, gw, cfg)
	ctx := context.Background()

	live, err := p.AcquireFor(ctx, "live", Spec{}, Intent{ExecID: "exec-live", Note: "n-live"})
	if err != nil {
		t.Fatal(err)
	}
	dead, err := p.AcquireFor(ctx, "dead", Spec{}, Intent{ExecID: "exec-dead", Note: "n-dead"})
	if err != nil {
		t.Fatal(err)
	}
	// The take made the sandbox, so the exec is not armed yet: the holder
	// arms it as it starts the command.
	if err := p.Arm(ctx, dead); err != nil {
		t.Fatal(err)
	}
	dead.stop() // the holder died
	rdb.HSet(ctx, p.recordKey("dead"), "cwd", "/work")

	var got []Orphan
	waitFor(t, "the dead holder's task to be claimed", func() bool {
		o, err := q.ClaimOrphans(ctx)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, o...)
		return len(got) > 0
	})
	if len(got) != 1 || got[0].Lease.TaskID() != "dead" {
		t.Fatalf("claimed %v, want the task dead alone", got)
	}
	o := got[0]
	if len(o.Execs) != 1 || o.Execs[0] != (OrphanExec{ExecID: "exec-dead", Note: "n-dead", Armed: true}) {
		t.Errorf("execs = %v, want exec-dead with its note", o.Execs)
	}
	if o.Lease.Cwd() != "/work" || o.Lease.SandboxID() != dead.SandboxID() {
		t.Errorf("rescue lease: cwd %q sandbox %q; want /work and %q", o.Lease.Cwd(), o.Lease.SandboxID(), dead.SandboxID())
	}
	// Claimed once: nobody else gets it while the rescuer holds it.
	if more, _ := p.ClaimOrphans(ctx); len(more) != 0 {
		t.Errorf("claimed twice: %v", more)
	}
	// The dead holder's writes are fenced out.
	if err := p.Release(ctx, dead, "/dead"); !errors.Is(err, ErrStaleLease) {
		t.Errorf("dead holder's release = %v, want ErrStaleLease", err)
	}
	o.Lease.Rescue("exec-dead")
	mustRelease(t, q, o.Lease, "/rescued")
	if rec, _, _ := p.Get(ctx, "dead"); rec.Cwd != "/rescued" {
		t.Errorf("cwd after rescue = %q, want /rescued", rec.Cwd)
	}
	if n := rdb.ZScore(ctx, p.inflightKey, "dead").Err(); !errors.Is(n, redis.Nil) {
		t.Errorf("rescued task still in the in-flight index (%v)", n)
	}
	mustRelease(t, p, live, "")
	if n := rdb.ZCard(ctx, p.inflightKey).Val(); n != 0 {
		t.Errorf("in-flight index has %d entries after every release, want 0", n)
	}
}

// TestReapSparesPendingCreate: a create whose answer was lost leaves a
// pending record (no sandbox id) while the gateway has the sandbox. The
// reaper must leave the record, with its idempotency key, for the task's
// job to come back and find that sandbox; deleting it orphaned the sandbox
// and made a second one (reliability.TestGatewayFaults at 30 %).
func TestReapSparesPendingCreate(t *testing.T) {
	ctx := context.Background()
	gw := newFakeGateway()
	p, _ := newPool(t, gw, Config{InFlightGrace: time.Hour})
	lost := errors.New("connection reset after the create")
	gw.afterCreate = func(string) error { return lost }
	if _, err := p.Acquire(ctx, "task", Spec{}, ""); !errors.Is(err, lost) {
		t.Fatalf("Acquire with the create's answer lost: %v", err)
	}
	gw.afterCreate = nil

	if n, err := p.ReapIdle(ctx, time.Now().Add(time.Minute), time.Second); n != 0 || err != nil {
		t.Fatalf("ReapIdle of the pending record = %d, %v; want 0, nil", n, err)
	}
	l := mustAcquire(t, p, "task", Spec{})
	mustRelease(t, p, l, "")
	if len(gw.byKey) != 1 || len(gw.live) != 1 {
		t.Errorf("%d sandboxes made, %d live; want the one the lost create made", len(gw.byKey), len(gw.live))
	}

	// A pending record nobody comes back for goes after the grace.
	gw.afterCreate = func(string) error { return lost }
	if _, err := p.Acquire(ctx, "task2", Spec{}, ""); !errors.Is(err, lost) {
		t.Fatalf("Acquire task2: %v", err)
	}
	if n, err := p.ReapIdle(ctx, time.Now().Add(2*time.Hour), time.Second); n != 2 || err != nil {
		t.Fatalf("ReapIdle past the grace = %d, %v; want 2 (task and task2), nil", n, err)
	}
	if n, err := p.Live(ctx); n != 0 || err != nil {
		t.Errorf("Live = %d, %v; want no record left", n, err)
	}
}

// TestRefusedCreateFreesItsSlot: a create the gateway refuses for good (a
// 400) made no sandbox, so its pending record is dropped at once instead of
// being spared by the reaper, with its slot under the cap, for
// InFlightGrace.
func TestRefusedCreateFreesItsSlot(t *testing.T) {
	ctx := context.Background()
	gw := newFakeGateway()
	p, _ := newPool(t, gw, Config{MaxSandboxes: 1, AcquireWait: 100 * time.Millisecond})
	refused := &gateway.APIError{StatusCode: 400, Method: "POST", Path: "/v1/sandboxes", Message: "unknown image"}
	gw.beforeCreate = func(string) error { return refused }
	if _, err := p.Acquire(ctx, "bad", Spec{}, ""); !errors.As(err, new(*gateway.APIError)) {
		t.Fatalf("Acquire with a refused create: %v", err)
	}
	gw.beforeCreate = nil
	if n, err := p.Live(ctx); n != 0 || err != nil {
		t.Errorf("Live after a refused create = %d, %v; want 0", n, err)
	}
	l, err := p.Acquire(ctx, "good", Spec{}, "")
	if err != nil {
		t.Fatalf("Acquire after a refused create, cap 1: %v", err)
	}
	mustRelease(t, p, l, "")
}

// waitFor polls cond until it holds, failing the test after 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// inflightMarks lists the in-flight marks of a record.
func inflightMarks(t *testing.T, rdb redis.UniversalClient, record string) []string {
	t.Helper()
	var marks []string
	for _, k := range rdb.HKeys(context.Background(), record).Val() {
		if strings.HasPrefix(k, "inflight:") {
			marks = append(marks, k)
		}
	}
	return marks
}

// TestCreatedExcludesPendingCreates: a record whose create the gateway has
// not answered with an id (a 429, a create in flight) counts in Live (the
// cap applies to it) but not in Created (boxq_sandboxes_live), and a stale
// note of a pending create is dropped.
func TestCreatedExcludesPendingCreates(t *testing.T) {
	ctx := context.Background()
	gw := newFakeGateway()
	p, rdb := newPool(t, gw, Config{AcquireWait: 100 * time.Millisecond})
	full := &gateway.APIError{StatusCode: 429, Method: "POST", Path: "/v1/sandboxes", Message: "64 live, the maximum"}
	gw.beforeCreate = func(string) error { return full }
	if _, err := p.Acquire(ctx, "refused", Spec{}, ""); !errors.As(err, new(*gateway.APIError)) {
		t.Fatalf("Acquire with a 429 create: %v", err)
	}
	gw.beforeCreate = nil
	l, err := p.Acquire(ctx, "made", Spec{}, "")
	if err != nil {
		t.Fatalf("Acquire: %v", err)
	}
	mustRelease(t, p, l, "")
	live, err := p.Live(ctx)
	if err != nil {
		t.Fatal(err)
	}
	created, err := p.Created(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if created != 1 || live < created {
		t.Errorf("Created = %d, Live = %d; want Created 1 (the refused create's record is not a sandbox)", created, live)
	}
	// A stale member (its record answered meanwhile) is dropped.
	if err := rdb.SAdd(ctx, "boxq:creating", "made").Err(); err != nil {
		t.Fatal(err)
	}
	if created, err := p.Created(ctx); created != 1 || err != nil {
		t.Errorf("Created with a stale note = %d, %v; want 1", created, err)
	}
	if ok, _ := rdb.SIsMember(ctx, "boxq:creating", "made").Result(); ok {
		t.Error("the stale note of task made was not dropped")
	}
}

// TestRefusedCreateLeavesNoPendingNote: a create refused for good drops
// its record, and its note in the set of pending creates with it: without
// a scrape of the metrics (Created), nothing else would ever drop it, and
// every task whose create was refused would stay there.
func TestRefusedCreateLeavesNoPendingNote(t *testing.T) {
	ctx := context.Background()
	gw := newFakeGateway()
	p, rdb := newPool(t, gw, Config{AcquireWait: 100 * time.Millisecond})
	gw.beforeCreate = func(string) error {
		return &gateway.APIError{StatusCode: 400, Method: "POST", Path: "/v1/sandboxes", Message: "unknown image"}
	}
	if _, err := p.Acquire(ctx, "bad", Spec{}, ""); !errors.As(err, new(*gateway.APIError)) {
		t.Fatalf("Acquire with a refused create: %v", err)
	}
	if ok, err := rdb.SIsMember(ctx, "boxq:creating", "bad").Result(); ok || err != nil {
		t.Errorf("task bad is still noted as a pending create (%v, %v)", ok, err)
	}
}
