package local

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/uuid"

	"github.com/boxq/boxq/gateway"
)

// sandboxGone reports whether sb answers 404 to a poll of execID.
func (g *testGateway) sandboxGone(t testing.TB, sb, execID string) bool {
	t.Helper()
	r := g.poll(t, sb, execID, 0)
	if r.status == http.StatusNotFound {
		if want := "sandbox " + sb + " not found"; r.errorMessage() != want {
			t.Errorf("got error %q, want %q", r.errorMessage(), want)
		}
		return true
	}
	return false
}

func TestIdleTimeout(t *testing.T) {
	g := newGateway(t, Config{})

	t.Run("idle sandbox is terminated", func(t *testing.T) {
		sb := g.create(t, gateway.CreateRequest{IdleTimeoutMs: 300}, "")
		st := g.run(t, sb, "true")
		begin := time.Now()
		waitFor(t, 5*time.Second, "sandbox idle-terminated", func() bool { return g.sandboxGone(t, sb, st.ExecID) })
		t.Logf("idle sandbox terminated %v after its last exec", time.Since(begin))
		r := g.do(t, "POST", "/v1/sandboxes/"+sb+"/execs", gateway.StartRequest{Command: "true"})
		if r.status != http.StatusNotFound {
			t.Errorf("start after idle timeout: got %d, want 404", r.status)
		}
		// The janitor removes the files right after the sandbox left the map.
		waitFor(t, 5*time.Second, "the sandbox's files removed", func() bool {
			_, err := os.Stat(filepath.Join(g.srv.stateDir, "sandboxes", sb))
			return os.IsNotExist(err)
		})
	})
	t.Run("a running exec keeps it alive", func(t *testing.T) {
		sb := g.create(t, gateway.CreateRequest{IdleTimeoutMs: 200}, "")
		st := g.run(t, sb, "sleep 0.8")
		if st.Status != gateway.StatusCompleted {
			t.Errorf("an exec longer than the idle timeout: got %s/%d, want completed", st.Status, st.RC())
		}
	})
}

func TestLifetime(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode, StartWait: -1})
		sb := g.create(t, gateway.CreateRequest{TimeoutMs: 700}, "")
		marker := newMarker()
		st := g.start(t, sb, gateway.StartRequest{Command: markerCommand(marker), TimeoutMs: 60_000})
		waitMarker(t, marker, true, 10*time.Second)
		waitFor(t, 5*time.Second, "sandbox terminated at its lifetime", func() bool { return g.sandboxGone(t, sb, st.ExecID) })
		waitMarker(t, marker, false, 10*time.Second)
	})
}

// fakeClock is a clock that tests move by hand.
type fakeClock struct{ offset atomic.Int64 }

func (c *fakeClock) now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *fakeClock) advance(d time.Duration) { c.offset.Add(int64(d)) }

func TestLifetimeByClock(t *testing.T) {
	clock := &fakeClock{}
	g := newGateway(t, Config{Now: clock.now})
	sb := g.create(t, gateway.CreateRequest{TimeoutMs: 3_600_000, IdleTimeoutMs: 3_600_000}, "")
	st := g.run(t, sb, "true")
	if g.sandboxGone(t, sb, st.ExecID) {
		t.Fatalf("sandbox gone before its time")
	}
	clock.advance(61 * time.Minute)
	waitFor(t, 5*time.Second, "sandbox terminated after its lifetime", func() bool { return g.sandboxGone(t, sb, st.ExecID) })
}

func TestExecRetention(t *testing.T) {
	clock := &fakeClock{}
	g := newGateway(t, Config{Now: clock.now, ExecRetention: time.Minute})
	sb := g.create(t, gateway.CreateRequest{TimeoutMs: 3_600_000, IdleTimeoutMs: 3_600_000}, "")
	st := g.run(t, sb, "echo kept")
	clock.advance(30 * time.Second)
	var got gateway.ExecState
	decode(t, "poll within retention", g.poll(t, sb, st.ExecID, 0), http.StatusOK, &got)
	if got.Output != "kept\n" {
		t.Errorf("got output %q, want %q", got.Output, "kept\n")
	}
	clock.advance(31 * time.Second)
	waitFor(t, 5*time.Second, "exec forgotten", func() bool {
		r := g.poll(t, sb, st.ExecID, 0)
		return r.status == http.StatusNotFound && strings.Contains(r.errorMessage(), "exec "+st.ExecID+" expired")
	})
	// Forgotten, its id still never runs again.
	r := g.do(t, "POST", "/v1/sandboxes/"+sb+"/execs", gateway.StartRequest{ExecID: st.ExecID, Command: "echo ran again > ~/again"})
	if r.status != http.StatusConflict || !strings.Contains(r.errorMessage(), "expired") {
		t.Errorf("start with an expired execId: got %d %s, want 409 expired", r.status, r.body)
	}
	if out := g.mustRun(t, sb, "cat ~/again 2>/dev/null; true"); out != "" {
		t.Errorf("the expired exec ran again: %q", out)
	}
	if r := g.poll(t, sb, "never-was", 0); r.status != http.StatusNotFound || r.errorMessage() != "exec never-was not found" {
		t.Errorf("poll of an unknown exec: got %d %s, want 404 not found", r.status, r.body)
	}
}

func TestPersistence(t *testing.T) {
	g := newGateway(t, Config{})

	type side struct {
		persistent bool
		key        string
	}
	tests := []struct {
		name     string
		first    side
		snapshot bool
		second   side
		want     bool
	}{
		{"kept and restored", side{true, "k"}, true, side{true, "k"}, true},
		{"no snapshot asked", side{true, "k"}, false, side{true, "k"}, false},
		{"first not persistent", side{false, "k"}, true, side{true, "k"}, false},
		{"second not persistent", side{true, "k"}, true, side{false, "k"}, false},
		{"another key", side{true, "k"}, true, side{true, "other"}, false},
		{"no logical key", side{true, ""}, true, side{true, ""}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Keys unique to the subtest, so that cases do not see each other.
			key := func(k string) string {
				if k == "" {
					return ""
				}
				return t.Name() + "/" + k
			}
			sb := g.create(t, gateway.CreateRequest{PersistentFilesystem: tt.first.persistent, LogicalKey: key(tt.first.key)}, "")
			g.mustRun(t, sb, "mkdir -p ~/d && echo saved > ~/d/file && chmod 640 ~/d/file && ln -s d/file ~/link")
			decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{SnapshotBeforeTerminate: tt.snapshot}), http.StatusOK, nil)

			sb2 := g.create(t, gateway.CreateRequest{PersistentFilesystem: tt.second.persistent, LogicalKey: key(tt.second.key)}, "")
			if sb2 == sb {
				t.Fatalf("second create: got the first sandbox's id")
			}
			got := g.run(t, sb2, "cat ~/link && stat -c %a ~/d/file").Output
			if tt.want && got != "saved\n640\n" {
				t.Errorf("restored files: got %q, want %q", got, "saved\n640\n")
			}
			if !tt.want && strings.Contains(got, "saved") {
				t.Errorf("got %q: files restored, want a fresh sandbox", got)
			}
		})
	}

	t.Run("a restore leaves the snapshot for the next", func(t *testing.T) {
		key := t.Name()
		create := func() string {
			return g.create(t, gateway.CreateRequest{PersistentFilesystem: true, LogicalKey: key}, "")
		}
		terminate := func(sb string, snapshot bool) {
			decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{SnapshotBeforeTerminate: snapshot}), http.StatusOK, nil)
		}
		sb := create()
		g.mustRun(t, sb, "echo v1 > ~/v")
		terminate(sb, true)
		sb = create()
		g.mustRun(t, sb, "echo v2 > ~/v")
		terminate(sb, false) // v2 is thrown away; v1 stays
		sb = create()
		if got := g.mustRun(t, sb, "cat ~/v"); got != "v1\n" {
			t.Errorf("got %q, want v1", got)
		}
		g.mustRun(t, sb, "echo v3 > ~/v")
		terminate(sb, true) // v3 replaces v1
		sb = create()
		if got := g.mustRun(t, sb, "cat ~/v"); got != "v3\n" {
			t.Errorf("got %q, want v3", got)
		}
	})

	t.Run("an idle reap keeps a persistent sandbox's files", func(t *testing.T) {
		key := t.Name()
		sb := g.create(t, gateway.CreateRequest{PersistentFilesystem: true, LogicalKey: key, IdleTimeoutMs: 200}, "")
		st := g.run(t, sb, "echo reaped > ~/r")
		waitFor(t, 5*time.Second, "sandbox idle-terminated", func() bool { return g.sandboxGone(t, sb, st.ExecID) })
		sb = g.create(t, gateway.CreateRequest{PersistentFilesystem: true, LogicalKey: key}, "")
		if got := g.mustRun(t, sb, "cat ~/r"); got != "reaped\n" {
			t.Errorf("got %q, want reaped", got)
		}
	})
}

func TestRestartKeepsSnapshots(t *testing.T) {
	dir := newStateDir(t)
	token := "tok-" + uuid.NewString()
	first, err := New(Config{Token: token, StateDir: dir, Isolation: IsolationNone})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if _, err := New(Config{Token: token, StateDir: dir, Isolation: IsolationNone}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("a second server on the same state dir: got %v, want an error saying it is in use", err)
	}
	// A sandbox left behind by a crash: its files go at the next start.
	stale := filepath.Join(dir, "sandboxes", "sb-stale")
	if err := os.MkdirAll(stale, 0o700); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sb, err := first.create(ctx, "", createSpec{cwd: "/root", lifetime: time.Hour, idle: time.Hour, persistent: true, logicalKey: "task-1"})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	first.mu.Lock()
	home := first.sandboxes[sb].dirs.home
	first.mu.Unlock()
	if err := os.WriteFile(filepath.Join(home, "f"), []byte("across restarts"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := first.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}

	g := newGateway(t, Config{Token: token, StateDir: dir})
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale sandbox dir: got %v, want it removed", err)
	}
	sb = g.create(t, gateway.CreateRequest{PersistentFilesystem: true, LogicalKey: "task-1"}, "")
	if got := g.mustRun(t, sb, "cat ~/f"); got != "across restarts" {
		t.Errorf("got %q, want the file kept by Close", got)
	}
}

func TestCreateIdempotency(t *testing.T) {
	t.Run("same key, same sandbox", func(t *testing.T) {
		g := newGateway(t, Config{})
		a := g.create(t, gateway.CreateRequest{}, "key-1")
		b := g.create(t, gateway.CreateRequest{}, "key-1")
		c := g.create(t, gateway.CreateRequest{}, "key-2")
		d := g.create(t, gateway.CreateRequest{}, "")
		e := g.create(t, gateway.CreateRequest{}, "")
		if a != b {
			t.Errorf("same key: got ids %s and %s, want one", a, b)
		}
		if len(map[string]bool{a: true, c: true, d: true, e: true}) != 4 {
			t.Errorf("different or no keys: got ids %s %s %s %s, want four", a, c, d, e)
		}
		// After a terminate the key still names the terminated sandbox, so
		// a retried create cannot make a second one; its calls get 404.
		decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+a+"/terminate", nil), http.StatusOK, nil)
		if again := g.create(t, gateway.CreateRequest{}, "key-1"); again != a {
			t.Errorf("after terminate: got %s, want %s", again, a)
		}
		r := g.do(t, "POST", "/v1/sandboxes/"+a+"/execs", gateway.StartRequest{Command: "true"})
		if r.status != http.StatusNotFound {
			t.Errorf("start in the terminated sandbox: got %d, want 404", r.status)
		}
	})
	t.Run("20 concurrent creates, one sandbox", func(t *testing.T) {
		g := newGateway(t, Config{})
		key := uuid.NewString()
		ids := make([]string, 20)
		var wg sync.WaitGroup
		for i := range ids {
			wg.Go(func() {
				r, err := g.send("POST", "/v1/sandboxes", gateway.CreateRequest{LogicalKey: "task"}, "", "x-idempotency-key", key)
				var resp gateway.CreateResponse
				if err == nil {
					err = json.Unmarshal(r.body, &resp)
				}
				if err != nil || r.status != http.StatusOK {
					t.Errorf("create %d: got %d %s, %v", i, r.status, r.body, err)
				}
				ids[i] = resp.ID
			})
		}
		wg.Wait()
		for i, id := range ids {
			if id != ids[0] {
				t.Errorf("create %d: got %s, want %s like create 0", i, id, ids[0])
			}
		}
		var list gateway.ListResponse
		decode(t, "list", g.do(t, "GET", "/v1/sandboxes", nil), http.StatusOK, &list)
		if len(list.Sandboxes) != 1 {
			t.Errorf("got %d live sandboxes, want 1", len(list.Sandboxes))
		}
	})
}

func TestCapacity(t *testing.T) {
	t.Run("sandboxes", func(t *testing.T) {
		g := newGateway(t, Config{MaxSandboxes: 2})
		a := g.create(t, gateway.CreateRequest{}, "a")
		g.create(t, gateway.CreateRequest{}, "b")
		r := g.do(t, "POST", "/v1/sandboxes", gateway.CreateRequest{}, "x-idempotency-key", "c")
		if r.status != http.StatusTooManyRequests {
			t.Fatalf("third create: got %d %s, want 429", r.status, r.body)
		}
		if secs, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || secs < 1 {
			t.Errorf("Retry-After: got %q, want a number of seconds >= 1", r.header.Get("Retry-After"))
		}
		if !strings.Contains(r.errorMessage(), "too many sandboxes") {
			t.Errorf("got error %q, want it to say too many sandboxes", r.errorMessage())
		}
		// A key that already has its sandbox is no new sandbox.
		if got := g.create(t, gateway.CreateRequest{}, "a"); got != a {
			t.Errorf("known key at capacity: got %s, want %s", got, a)
		}
		decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+a+"/terminate", nil), http.StatusOK, nil)
		g.create(t, gateway.CreateRequest{}, "c")
	})
	t.Run("running execs", func(t *testing.T) {
		g := newGateway(t, Config{MaxRunningExecs: 1, StartWait: -1})
		sb := g.newSandbox(t)
		st := g.start(t, sb, gateway.StartRequest{Command: "sleep 30", TimeoutMs: 60_000})
		r := g.do(t, "POST", "/v1/sandboxes/"+sb+"/execs", gateway.StartRequest{ExecID: "second", Command: "true"})
		if r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" {
			t.Errorf("second start: got %d (Retry-After %q), want 429 with Retry-After", r.status, r.header.Get("Retry-After"))
		}
		decode(t, "cancel", g.do(t, "POST", fmt.Sprintf("/v1/sandboxes/%s/execs/%s/cancel", sb, st.ExecID), nil), http.StatusOK, nil)
		g.wait(t, sb, st.ExecID, 5*time.Second)
		if st := g.run(t, sb, "true"); st.Status != gateway.StatusCompleted {
			t.Errorf("start after the first ended: got %s", st.Status)
		}
	})
}

func TestList(t *testing.T) {
	g := newGateway(t, Config{StartWait: -1})
	before := time.Now().Add(-time.Second)
	a := g.create(t, gateway.CreateRequest{LogicalKey: "task-a"}, "")
	b := g.create(t, gateway.CreateRequest{LogicalKey: "task-b"}, "")
	st := g.start(t, b, gateway.StartRequest{Command: "sleep 30", TimeoutMs: 60_000})

	var list gateway.ListResponse
	decode(t, "list", g.do(t, "GET", "/v1/sandboxes", nil), http.StatusOK, &list)
	type entry struct{ ID, LogicalKey, Status string }
	var got []entry
	for _, s := range list.Sandboxes {
		got = append(got, entry{s.ID, s.LogicalKey, s.Status})
		for _, ts := range []string{s.CreatedAt, s.LastActiveAt} {
			if tm, err := time.Parse(time.RFC3339Nano, ts); err != nil || tm.Before(before) {
				t.Errorf("sandbox %s: got time %q (%v), want a recent RFC 3339 time", s.ID, ts, err)
			}
		}
	}
	want := []entry{{a, "task-a", "running"}, {b, "task-b", "running"}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("list (-want +got):\n%s", diff)
	}
	if len(list.Sandboxes) == 2 && list.Sandboxes[1].RunningExecs != 1 {
		t.Errorf("running execs of %s: got %d, want 1", b, list.Sandboxes[1].RunningExecs)
	}

	decode(t, "cancel", g.do(t, "POST", fmt.Sprintf("/v1/sandboxes/%s/execs/%s/cancel", b, st.ExecID), nil), http.StatusOK, nil)
	decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+a+"/terminate", nil), http.StatusOK, nil)
	decode(t, "list", g.do(t, "GET", "/v1/sandboxes", nil), http.StatusOK, &list)
	if len(list.Sandboxes) != 1 || list.Sandboxes[0].ID != b {
		t.Errorf("after terminate: got %+v, want only %s", list.Sandboxes, b)
	}
}

func TestTerminate(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode, StartWait: -1})
		sb := g.newSandbox(t)
		marker := newMarker()
		st := g.start(t, sb, gateway.StartRequest{Command: markerCommand(marker), TimeoutMs: 60_000})
		waitMarker(t, marker, true, 10*time.Second)
		dir := filepath.Join(g.srv.stateDir, "sandboxes", sb)
		var resp gateway.StatusResponse
		decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{}), http.StatusOK, &resp)
		if resp.Status != "terminated" {
			t.Errorf("terminate: got %q, want terminated", resp.Status)
		}
		waitMarker(t, marker, false, 10*time.Second)
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("the sandbox's files: got %v, want them removed", err)
		}
		if !g.sandboxGone(t, sb, st.ExecID) {
			t.Errorf("poll after terminate: want 404")
		}
		r := g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", nil)
		if r.status != http.StatusNotFound {
			t.Errorf("second terminate: got %d, want 404", r.status)
		}
	})
}

func TestClose(t *testing.T) {
	g := newGateway(t, Config{StartWait: -1})
	sb := g.newSandbox(t)
	marker := newMarker()
	st := g.start(t, sb, gateway.StartRequest{Command: markerCommand(marker), TimeoutMs: 60_000})
	waitMarker(t, marker, true, 10*time.Second)

	// A long poll in flight returns when the server closes.
	polled := make(chan response, 1)
	go func() {
		r, err := g.send("GET", fmt.Sprintf("/v1/sandboxes/%s/execs/%s?waitMs=30000", sb, st.ExecID), nil, "")
		if err != nil {
			r.status, r.body = -1, []byte(err.Error())
		}
		polled <- r
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	begin := time.Now()
	if err := g.srv.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	t.Logf("Close took %v", time.Since(begin))
	waitMarker(t, marker, false, 10*time.Second)
	select {
	case r := <-polled:
		if r.status != http.StatusOK && r.status != http.StatusServiceUnavailable {
			t.Errorf("long poll during Close: got %d %s", r.status, r.body)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("long poll still waiting 5s after Close")
	}
	r := g.do(t, "POST", "/v1/sandboxes", gateway.CreateRequest{})
	if r.status != http.StatusServiceUnavailable || r.header.Get("Retry-After") == "" {
		t.Errorf("create after Close: got %d (Retry-After %q), want 503 with Retry-After", r.status, r.header.Get("Retry-After"))
	}
	if err := g.srv.Close(ctx); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
