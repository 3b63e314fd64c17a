package local

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/gateway"
)

// TestPythonClientRequests sends the seed's hermes-agent client
// (ManagedModalEnvironment) requests byte for byte: json.dumps spacing,
// float() counts, every header it sets, on every request, GET and the
// bodyless cancel included.
func TestPythonClientRequests(t *testing.T) {
	g := newGateway(t, Config{})
	send := func(method, path, body string, header ...string) response {
		t.Helper()
		var rd io.Reader
		if body != "" {
			rd = strings.NewReader(body)
		}
		req, err := http.NewRequest(method, g.url+path, rd)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+g.token)
		req.Header.Set("Content-Type", "application/json")
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := g.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		data, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return response{status: resp.StatusCode, header: resp.Header, body: data}
	}
	create := func() string {
		t.Helper()
		body := `{"image": "python:3.11", "cwd": "/root", "cpu": 1.0, "memoryMiB": 5120.0, "timeoutMs": 3600000, "idleTimeoutMs": 300000, "persistentFilesystem": true, "logicalKey": "task-1", "diskMiB": 10240.0}`
		var created gateway.CreateResponse
		decode(t, "create", send("POST", "/v1/sandboxes", body, "x-idempotency-key", uuid.NewString()), http.StatusOK, &created)
		return created.ID
	}
	// poll is the client's loop: GET without waitMs until the exec ends.
	poll := func(sb, execID string) gateway.ExecState {
		t.Helper()
		var st gateway.ExecState
		waitFor(t, 20*time.Second, "exec "+execID+" ended", func() bool {
			decode(t, "poll", send("GET", "/v1/sandboxes/"+sb+"/execs/"+execID, ""), http.StatusOK, &st)
			return gateway.Terminal(st.Status)
		})
		return st
	}

	sb := create()
	execID := uuid.NewString()
	start := fmt.Sprintf(`{"execId": "%s", "command": "cat > ~/kept && cat ~/kept", "cwd": "/root", "timeoutMs": 60000, "stdinData": "hello from python\n"}`, execID)
	decode(t, "start", send("POST", "/v1/sandboxes/"+sb+"/execs", start), http.StatusOK, nil)
	if st := poll(sb, execID); st.Status != gateway.StatusCompleted || st.Output != "hello from python\n" {
		t.Errorf("exec: got %s/%d %q, want completed \"hello from python\\n\"", st.Status, st.RC(), st.Output)
	}

	slow := uuid.NewString()
	decode(t, "start", send("POST", "/v1/sandboxes/"+sb+"/execs", fmt.Sprintf(`{"execId": "%s", "command": "sleep 30", "cwd": "/root", "timeoutMs": 60000}`, slow)), http.StatusOK, nil)
	decode(t, "cancel", send("POST", "/v1/sandboxes/"+sb+"/execs/"+slow+"/cancel", ""), http.StatusOK, nil)
	if st := poll(sb, slow); st.Status != gateway.StatusCancelled {
		t.Errorf("cancelled exec: got %s/%d, want cancelled", st.Status, st.RC())
	}

	decode(t, "terminate", send("POST", "/v1/sandboxes/"+sb+"/terminate", `{"snapshotBeforeTerminate": true}`), http.StatusOK, nil)
	// The snapshot was taken: the next sandbox of the key has the file.
	sb2 := create()
	if out := g.mustRun(t, sb2, "cat ~/kept"); out != "hello from python\n" {
		t.Errorf("after a terminate with snapshot: got %q, want the kept file", out)
	}
}

// TestLenientNumbers covers what a Python client may send in place of a
// Go int or bool: floats, None, and what is refused, with a clear message.
func TestLenientNumbers(t *testing.T) {
	g := newGateway(t, Config{})
	sb := g.newSandbox(t)
	execs := "/v1/sandboxes/" + sb + "/execs"
	tests := []struct {
		name      string
		path      string
		body      string
		want      int
		wantError string
	}{
		{"create: cpu 0.5", "/v1/sandboxes", `{"cpu": 0.5}`, 200, ""},
		{"create: counts as floats", "/v1/sandboxes", `{"memoryMiB": 5120.0, "diskMiB": 1.024e4, "timeoutMs": 3600000.0, "idleTimeoutMs": 3e5}`, 200, ""},
		{"create: every field null", "/v1/sandboxes", `{"image": null, "cwd": null, "cpu": null, "memoryMiB": null, "timeoutMs": null, "idleTimeoutMs": null, "persistentFilesystem": null, "logicalKey": null, "diskMiB": null}`, 200, ""},
		{"create: huge memoryMiB", "/v1/sandboxes", `{"memoryMiB": 1e15}`, 200, ""},
		{"create: fractional memoryMiB", "/v1/sandboxes", `{"memoryMiB": 5120.5}`, 400, `field "memoryMiB" is 5120.5: want a whole number`},
		{"create: fractional timeoutMs", "/v1/sandboxes", `{"timeoutMs": 1.5}`, 400, `field "timeoutMs" is 1.5: want a whole number`},
		{"create: boolean memoryMiB", "/v1/sandboxes", `{"memoryMiB": true}`, 400, `field "memoryMiB" is a boolean: want a number`},
		{"create: boolean cpu", "/v1/sandboxes", `{"cpu": false}`, 400, `field "cpu" is a boolean: want a number`},
		{"create: numeric persistentFilesystem", "/v1/sandboxes", `{"persistentFilesystem": 1}`, 400, `field "persistentFilesystem" is a number: want true or false`},
		{"create: negative float memoryMiB", "/v1/sandboxes", `{"memoryMiB": -1.0}`, 400, "memoryMiB -1 is negative"},
		{"start: float timeoutMs", execs, `{"command": "true", "timeoutMs": 60000.0}`, 200, ""},
		{"start: null timeoutMs, cwd, stdinData, execId", execs, `{"command": "true", "timeoutMs": null, "cwd": null, "stdinData": null, "execId": null}`, 200, ""},
		{"start: boolean timeoutMs", execs, `{"command": "true", "timeoutMs": true}`, 400, `field "timeoutMs" is a boolean`},
		{"start: fractional timeoutMs", execs, `{"command": "true", "timeoutMs": 0.5}`, 400, "want a whole number"},
		{"terminate: null flag", "/v1/sandboxes/" + g.newSandbox(t) + "/terminate", `{"snapshotBeforeTerminate": null}`, 200, ""},
		{"terminate: numeric flag", "/v1/sandboxes/" + sb + "/terminate", `{"snapshotBeforeTerminate": 1}`, 400, `field "snapshotBeforeTerminate" is a number`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := g.do(t, "POST", tt.path, tt.body)
			if r.status != tt.want || !strings.Contains(r.errorMessage(), tt.wantError) {
				t.Errorf("got %d %s, want %d %q", r.status, r.body, tt.want, tt.wantError)
			}
		})
	}
	done := g.run(t, sb, "true")
	for _, q := range []struct {
		wait string
		want int
	}{{"1000.0", 200}, {"0", 200}, {"1.5", 400}, {"-1", 400}, {"1e3", 200}} {
		if r := g.do(t, "GET", execs+"/"+done.ExecID+"?waitMs="+q.wait, nil); r.status != q.want {
			t.Errorf("waitMs=%s: got %d %s, want %d", q.wait, r.status, r.body, q.want)
		}
	}
}

// TestRetentionCaps checks the bounds on finished execs (by count, by
// bytes), on tombstones, and on running execs per sandbox.
func TestRetentionCaps(t *testing.T) {
	expired := func(t *testing.T, g *testGateway, sb, id string) {
		t.Helper()
		r := g.poll(t, sb, id, 0)
		if r.status != http.StatusNotFound || !strings.Contains(r.errorMessage(), "expired") {
			t.Errorf("poll of evicted %s: got %d %s, want 404 expired", id, r.status, r.body)
		}
		r = g.do(t, "POST", "/v1/sandboxes/"+sb+"/execs", gateway.StartRequest{ExecID: id, Command: "touch ~/ran-again"})
		if r.status != http.StatusConflict {
			t.Errorf("start of evicted %s: got %d %s, want 409", id, r.status, r.body)
		}
	}
	kept := func(t *testing.T, g *testGateway, sb, id string) {
		t.Helper()
		var st gateway.ExecState
		decode(t, "poll "+id, g.poll(t, sb, id, 0), http.StatusOK, &st)
	}

	t.Run("count", func(t *testing.T) {
		g := newGateway(t, Config{MaxRetainedExecs: 2})
		sb := g.newSandbox(t)
		a, b, c := g.run(t, sb, "echo a"), g.run(t, sb, "echo b"), g.run(t, sb, "echo c")
		expired(t, g, sb, a.ExecID)
		kept(t, g, sb, b.ExecID)
		kept(t, g, sb, c.ExecID)
		g.mustRun(t, sb, "test ! -e ~/ran-again")
	})
	t.Run("bytes", func(t *testing.T) {
		// Each answer holds 3000 bytes of output: two fit, three do not.
		g := newGateway(t, Config{MaxRetainedBytes: 8000})
		sb := g.newSandbox(t)
		var ids []string
		for range 3 {
			ids = append(ids, g.run(t, sb, "head -c 3000 /dev/zero | tr '\\0' x").ExecID)
		}
		expired(t, g, sb, ids[0])
		kept(t, g, sb, ids[1])
		kept(t, g, sb, ids[2])
		g.srv.mu.Lock()
		bytes := g.srv.retainedBytes
		g.srv.mu.Unlock()
		if bytes > 8000 {
			t.Errorf("retained %d bytes, over the cap of 8000", bytes)
		}
	})
	t.Run("tombstones", func(t *testing.T) {
		g := newGateway(t, Config{MaxRetainedExecs: 1, MaxTombstones: 1})
		sb := g.newSandbox(t)
		a, b, _ := g.run(t, sb, "true"), g.run(t, sb, "true"), g.run(t, sb, "true")
		expired(t, g, sb, b.ExecID)
		// a's tombstone made room for b's: only "not found" is left of it.
		if r := g.poll(t, sb, a.ExecID, 0); r.status != http.StatusNotFound || strings.Contains(r.errorMessage(), "expired") {
			t.Errorf("poll of %s past the tombstones: got %d %s, want 404 not found", a.ExecID, r.status, r.body)
		}
	})
	t.Run("running per sandbox", func(t *testing.T) {
		g := newGateway(t, Config{MaxSandboxRunningExecs: 2, StartWait: -1})
		sb, other := g.newSandbox(t), g.newSandbox(t)
		for range 2 {
			g.start(t, sb, gateway.StartRequest{Command: "sleep 30"})
		}
		r := g.do(t, "POST", "/v1/sandboxes/"+sb+"/execs", gateway.StartRequest{ExecID: "third", Command: "true"})
		if r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" {
			t.Errorf("third running exec: got %d %s, want 429 with Retry-After", r.status, r.body)
		}
		g.mustRun(t, other, "true")
	})
}

// recordWriter is an http.ResponseWriter that keeps what it is given:
// the slices themselves, not copies.
type recordWriter struct {
	h      http.Header
	writes [][]byte
}

func (w *recordWriter) Header() http.Header { return w.h }
func (w *recordWriter) Write(p []byte) (int, error) {
	w.writes = append(w.writes, p)
	return len(p), nil
}
func (w *recordWriter) WriteHeader(int) {}

// TestPollEncodesOnce checks that a poll of a finished exec writes the
// answer encoded when the exec ended, the very bytes, rather than encode
// its output again (which costs a pass over up to 1 MiB per poll, and a
// buffer as large per concurrent poll).
func TestPollEncodesOnce(t *testing.T) {
	g := newGateway(t, Config{})
	sb := g.newSandbox(t)
	st := g.run(t, sb, "head -c 1048576 /dev/zero | tr '\\0' x")
	if len(st.Output) != 1<<20 {
		t.Fatalf("got %d bytes of output, want 1 MiB", len(st.Output))
	}
	e, err := g.srv.execOf(sb, st.ExecID)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest("GET", "/v1/sandboxes/"+sb+"/execs/"+st.ExecID, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+g.token)
	for i := range 3 {
		w := &recordWriter{h: http.Header{}}
		g.srv.Handler().ServeHTTP(w, req)
		if len(w.writes) != 1 || len(w.writes[0]) != len(e.encoded) || &w.writes[0][0] != &e.encoded[0] {
			t.Fatalf("poll %d: got %d writes, want the one stored answer of %d bytes, written as is", i, len(w.writes), len(e.encoded))
		}
	}
	var got gateway.ExecState
	if err := json.Unmarshal(e.encoded, &got); err != nil || got.Output != st.Output || got.Status != gateway.StatusCompleted {
		t.Errorf("stored answer: got %s %d bytes, %v", got.Status, len(got.Output), err)
	}
}
