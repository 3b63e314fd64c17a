package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const testToken = "s3cret-token-xyz"

// fakeGateway is a hand-written gateway for failure cases: each test sets
// the funcs it needs; calls are recorded.
type fakeGateway struct {
	start  func(w http.ResponseWriter, r *http.Request, req StartRequest)
	poll   func(w http.ResponseWriter, r *http.Request, n int)
	create func(w http.ResponseWriter, r *http.Request)

	mu      sync.Mutex
	calls   []string // "METHOD path?query"
	bodies  []string
	headers []http.Header
	polls   atomic.Int32
	cancels atomic.Int32
}

func (f *fakeGateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	call := r.Method + " " + r.URL.Path
	if r.URL.RawQuery != "" {
		call += "?" + r.URL.RawQuery
	}
	f.calls = append(f.calls, call)
	f.bodies = append(f.bodies, string(body))
	f.headers = append(f.headers, r.Header.Clone())
	f.mu.Unlock()
	if r.Header.Get("Authorization") != "Bearer "+testToken {
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"error":"bad token"}`))
		return
	}
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/v1/sandboxes":
		if f.create != nil {
			f.create(w, r)
			return
		}
		_, _ = w.Write([]byte(`{"id":"sb-1"}`))
	case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/cancel"):
		f.cancels.Add(1)
		_, _ = w.Write([]byte(`{"status":"cancelling"}`))
	case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/terminate"):
		_, _ = w.Write([]byte(`{"status":"terminated"}`))
	case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/execs"):
		var req StartRequest
		_ = json.Unmarshal(body, &req)
		if f.start != nil {
			f.start(w, r, req)
			return
		}
		writeJSON(w, map[string]any{"execId": req.ExecID, "status": "running"})
	case r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/execs/"):
		n := int(f.polls.Add(1))
		if f.poll != nil {
			f.poll(w, r, n)
			return
		}
		writeJSON(w, map[string]any{"execId": "e1", "status": "running"})
	default:
		w.WriteHeader(http.StatusNotFound)
	}
}

func (f *fakeGateway) callList() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// runningGateway answers every poll "running" and signals the first one.
func runningGateway() (*fakeGateway, <-chan struct{}) {
	polled := make(chan struct{}, 1)
	return &fakeGateway{poll: func(w http.ResponseWriter, r *http.Request, n int) {
		select {
		case polled <- struct{}{}:
		default:
		}
		writeJSON(w, map[string]any{"execId": "e1", "status": "running"})
	}}, polled
}

func newTestClient(t *testing.T, h http.Handler, mod func(*Config)) *Client {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	cfg := Config{BaseURL: srv.URL, Token: testToken, HTTPClient: srv.Client()}
	if mod != nil {
		mod(&cfg)
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return c
}

func intp(i int) *int { return &i }

func TestRunPollsUntilCompleted(t *testing.T) {
	f := &fakeGateway{poll: func(w http.ResponseWriter, r *http.Request, n int) {
		if n < 3 {
			writeJSON(w, map[string]any{"execId": "e1", "status": "running"})
			return
		}
		writeJSON(w, map[string]any{"execId": "e1", "status": "completed", "output": "hi\n", "returncode": 0})
	}}
	c := newTestClient(t, f, nil)
	got, err := c.Run(context.Background(), "sb-1", StartRequest{ExecID: "e1", Command: "echo hi", TimeoutMs: 5000})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	want := ExecState{ExecID: "e1", Status: StatusCompleted, Output: "hi\n", ReturnCode: intp(0)}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("Run state (-got +want):\n%s", diff)
	}
	if n := f.polls.Load(); n != 3 {
		t.Errorf("polls = %d, want 3", n)
	}
	calls := f.callList()
	if !strings.Contains(calls[1], "waitMs=") {
		t.Errorf("first poll %q does not send waitMs", calls[1])
	}
}

func TestRunTerminalStartAnswerSkipsPolling(t *testing.T) {
	f := &fakeGateway{start: func(w http.ResponseWriter, r *http.Request, req StartRequest) {
		writeJSON(w, map[string]any{"execId": req.ExecID, "status": "failed", "output": "boom", "returncode": 3})
	}}
	c := newTestClient(t, f, nil)
	got, err := c.Run(context.Background(), "sb-1", StartRequest{ExecID: "e1", Command: "exit 3", TimeoutMs: 1000})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got.Status != StatusFailed || got.RC() != 3 || got.Output != "boom" {
		t.Errorf("Run = %+v rc %d, want failed/3/boom", got, got.RC())
	}
	if n := f.polls.Load(); n != 0 {
		t.Errorf("polls = %d, want 0", n)
	}
}

func TestStartAnswerForOtherExecIsAnError(t *testing.T) {
	f := &fakeGateway{start: func(w http.ResponseWriter, r *http.Request, req StartRequest) {
		writeJSON(w, map[string]any{"execId": "someone-else", "status": "running"})
	}}
	c := newTestClient(t, f, nil)
	_, err := c.Run(context.Background(), "sb-1", StartRequest{ExecID: "e1", Command: "true", TimeoutMs: 1000})
	if err == nil || !strings.Contains(err.Error(), "someone-else") {
		t.Fatalf("Run error = %v, want one naming the other exec id", err)
	}
}

func TestStart404IsSandboxGone(t *testing.T) {
	f := &fakeGateway{start: func(w http.ResponseWriter, r *http.Request, req StartRequest) {
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"error":"sandbox sb-1 not found"}`))
	}}
	c := newTestClient(t, f, nil)
	_, err := c.Run(context.Background(), "sb-1", StartRequest{ExecID: "e1", Command: "true", TimeoutMs: 1000})
	if !errors.Is(err, ErrSandboxGone) {
		t.Fatalf("Run error = %v, want ErrSandboxGone", err)
	}
	if StatusCode(err) != http.StatusNotFound {
		t.Errorf("StatusCode = %d, want 404", StatusCode(err))
	}
}

func TestPoll404IsExecNotFound(t *testing.T) {
	f := &fakeGateway{poll: func(w http.ResponseWriter, r *http.Request, n int) {
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"error":"exec e1 not found"}`))
	}}
	c := newTestClient(t, f, nil)
	_, err := c.Run(context.Background(), "sb-1", StartRequest{ExecID: "e1", Command: "true", TimeoutMs: 1000})
	if !errors.Is(err, ErrExecNotFound) || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("Run error = %v, want ErrExecNotFound saying not found", err)
	}
}

func TestCreateSendsCallersIdempotencyKeyAndExactBody(t *testing.T) {
	f := &fakeGateway{}
	c := newTestClient(t, f, nil)
	req := CreateRequest{Image: "python:3.11", Cwd: "/root", CPU: 1, MemoryMiB: 5120, TimeoutMs: 3600000,
		IdleTimeoutMs: 300000, PersistentFilesystem: false, LogicalKey: "task-1"}
	id, err := c.Create(context.Background(), "key-123", req)
	if err != nil || id != "sb-1" {
		t.Fatalf("Create = %q, %v; want sb-1, nil", id, err)
	}
	if err := c.Terminate(context.Background(), "sb-1", false); err != nil {
		t.Fatalf("Terminate: %v", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if got := f.headers[0].Get("x-idempotency-key"); got != "key-123" {
		t.Errorf("x-idempotency-key = %q, want key-123", got)
	}
	if got, want := f.headers[0].Get("Content-Type"), "application/json"; got != want {
		t.Errorf("Content-Type = %q, want %q", got, want)
	}
	wantCreate := `{"image":"python:3.11","cwd":"/root","cpu":1,"memoryMiB":5120,"timeoutMs":3600000,"idleTimeoutMs":300000,"persistentFilesystem":false,"logicalKey":"task-1"}`
	if f.bodies[0] != wantCreate {
		t.Errorf("create body\n got %s\nwant %s", f.bodies[0], wantCreate)
	}
	if got, want := f.calls[1], "POST /v1/sandboxes/sb-1/terminate"; got != want {
		t.Errorf("terminate call = %q, want %q", got, want)
	}
	if got, want := f.bodies[1], `{"snapshotBeforeTerminate":false}`; got != want {
		t.Errorf("terminate body = %s, want %s", got, want)
	}
}

func TestRunTimeoutCancelsExecAndReports124(t *testing.T) {
	f := &fakeGateway{}
	c := newTestClient(t, f, func(c *Config) { c.Grace = 50 * time.Millisecond; c.LongPoll = 20 * time.Millisecond })
	got, err := c.Run(context.Background(), "sb-1", StartRequest{ExecID: "e1", Command: "sleep 100", TimeoutMs: 50})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got.Status != StatusTimeout || got.RC() != ReturnCodeTimeout {
		t.Errorf("Run = %s/%d, want timeout/124", got.Status, got.RC())
	}
	if f.cancels.Load() != 1 {
		t.Errorf("cancels sent = %d, want 1", f.cancels.Load())
	}
	for _, call := range f.callList() {
		if strings.HasSuffix(call, "/terminate") {
			t.Errorf("timeout terminated the sandbox: %s", call)
		}
	}
}

func TestRunCallerCancelCancelsExecAndReports130(t *testing.T) {
	f, polled := runningGateway()
	c := newTestClient(t, f, func(c *Config) { c.LongPoll = 10 * time.Millisecond })
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-polled; cancel() }()
	got, err := c.Run(ctx, "sb-1", StartRequest{ExecID: "e1", Command: "sleep 100", TimeoutMs: 60000})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got.Status != StatusCancelled || got.RC() != ReturnCodeCancelled {
		t.Errorf("Run = %s/%d, want cancelled/130", got.Status, got.RC())
	}
	if f.cancels.Load() != 1 {
		t.Errorf("cancels sent = %d, want 1", f.cancels.Load())
	}
}

func TestRunDetachLeavesExecRunning(t *testing.T) {
	f, polled := runningGateway()
	c := newTestClient(t, f, func(c *Config) { c.LongPoll = 10 * time.Millisecond })
	ctx, cancel := context.WithCancelCause(context.Background())
	go func() { <-polled; cancel(ErrDetached) }()
	_, err := c.Run(ctx, "sb-1", StartRequest{ExecID: "e1", Command: "sleep 100", TimeoutMs: 60000})
	if !errors.Is(err, ErrDetached) {
		t.Fatalf("Run error = %v, want ErrDetached", err)
	}
	if f.cancels.Load() != 0 {
		t.Errorf("cancels sent = %d, want 0", f.cancels.Load())
	}
}

func TestRunSurvivesTransientPollFailures(t *testing.T) {
	f := &fakeGateway{poll: func(w http.ResponseWriter, r *http.Request, n int) {
		switch n {
		case 1, 2:
			w.WriteHeader(http.StatusServiceUnavailable)
		case 3:
			// Drop the connection without an answer.
			hj, ok := w.(http.Hijacker)
			if !ok {
				panic("no hijacker")
			}
			conn, _, _ := hj.Hijack()
			conn.Close()
		default:
			writeJSON(w, map[string]any{"execId": "e1", "status": "completed", "output": "ok", "returncode": 0})
		}
	}}
	c := newTestClient(t, f, nil)
	got, err := c.Run(context.Background(), "sb-1", StartRequest{ExecID: "e1", Command: "true", TimeoutMs: 10000})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got.Status != StatusCompleted || got.Output != "ok" {
		t.Errorf("Run = %+v, want completed/ok", got)
	}
	if n := f.polls.Load(); n != 4 {
		t.Errorf("polls = %d, want 4", n)
	}
}

func TestRunRetriesTransientStart(t *testing.T) {
	var starts atomic.Int32
	f := &fakeGateway{start: func(w http.ResponseWriter, r *http.Request, req StartRequest) {
		if starts.Add(1) == 1 {
			w.WriteHeader(http.StatusBadGateway)
			return
		}
		writeJSON(w, map[string]any{"execId": req.ExecID, "status": "completed", "returncode": 0})
	}}
	c := newTestClient(t, f, nil)
	got, err := c.Run(context.Background(), "sb-1", StartRequest{ExecID: "e1", Command: "true", TimeoutMs: 1000})
	if err != nil || got.Status != StatusCompleted {
		t.Fatalf("Run = %+v, %v; want completed", got, err)
	}
	if starts.Load() != 2 {
		t.Errorf("starts = %d, want 2", starts.Load())
	}
}

func TestUnauthorizedIsPermanentAndHidesToken(t *testing.T) {
	c := newTestClient(t, &fakeGateway{}, func(c *Config) { c.Token = "wrong-" + testToken })
	_, err := c.Run(context.Background(), "sb-1", StartRequest{ExecID: "e1", Command: "true", TimeoutMs: 1000})
	if err == nil {
		t.Fatal("Run with a wrong token succeeded")
	}
	if Classify(err) != Permanent || !errors.Is(err, ErrUnauthorized) {
		t.Errorf("Classify = %v, Is(ErrUnauthorized) = %v; want permanent, true", Classify(err), errors.Is(err, ErrUnauthorized))
	}
	if !strings.Contains(err.Error(), "GATEWAY_TOKEN") || !strings.Contains(err.Error(), "401") {
		t.Errorf("error %q does not say 401 and how to fix it", err)
	}
	if strings.Contains(err.Error(), testToken) {
		t.Errorf("error %q contains the token", err)
	}
}

func TestErrorBodies(t *testing.T) {
	tests := []struct {
		name   string
		status int
		body   string
		want   string
	}{
		{"json error", 400, `{"error":"command is empty"}`, "command is empty"},
		{"json message", 400, `{"message":"bad cwd"}`, "bad cwd"},
		{"json code", 400, `{"code":"E_QUOTA"}`, "E_QUOTA"},
		{"nested object", 500, `{"error":{"message":"disk full","code":17}}`, "disk full"},
		{"plain text", 502, "upstream exploded\n", "upstream exploded"},
		{"empty", 503, "", "HTTP 503"},
		{"token echoed", 400, `{"error":"token ` + testToken + ` invalid"}`, "token [REDACTED] invalid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeGateway{create: func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(tt.status)
				_, _ = w.Write([]byte(tt.body))
			}}
			c := newTestClient(t, f, nil)
			_, err := c.Create(context.Background(), "k", CreateRequest{})
			var ae *APIError
			if !errors.As(err, &ae) {
				t.Fatalf("Create error = %v, want *APIError", err)
			}
			if ae.Message != tt.want || ae.StatusCode != tt.status || ae.Path != "/v1/sandboxes" || ae.Method != "POST" {
				t.Errorf("APIError = %+v, want message %q status %d", ae, tt.want, tt.status)
			}
		})
	}
}

func TestClassify(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want Class
	}{
		{"429", &APIError{StatusCode: 429}, Capacity},
		{"503", &APIError{StatusCode: 503}, Transient},
		{"500 wrapped", errors.Join(errors.New("x"), &APIError{StatusCode: 500}), Transient},
		{"408", &APIError{StatusCode: 408}, Transient},
		{"400", &APIError{StatusCode: 400}, Permanent},
		{"401", &APIError{StatusCode: 401}, Permanent},
		{"403", &APIError{StatusCode: 403}, Permanent},
		{"404 create", &APIError{StatusCode: 404}, Permanent},
		{"transport", &TransportError{Err: io.ErrUnexpectedEOF}, Transient},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Classify(tt.err); got != tt.want {
				t.Errorf("Classify(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

func TestRetryAfterHeader(t *testing.T) {
	f := &fakeGateway{create: func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(http.StatusTooManyRequests)
	}}
	c := newTestClient(t, f, nil)
	_, err := c.Create(context.Background(), "k", CreateRequest{})
	if Classify(err) != Capacity || RetryAfter(err) != 7*time.Second {
		t.Errorf("429: class %v retry-after %v, want capacity 7s", Classify(err), RetryAfter(err))
	}
}

func TestMissingReturnCodeAndOutput(t *testing.T) {
	f := &fakeGateway{start: func(w http.ResponseWriter, r *http.Request, req StartRequest) {
		_, _ = w.Write([]byte(`{"execId":"` + req.ExecID + `","status":"failed","returncode":null}`))
	}}
	c := newTestClient(t, f, nil)
	got, err := c.Run(context.Background(), "sb-1", StartRequest{ExecID: "e1", Command: "x", TimeoutMs: 1000})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got.RC() != 1 || got.Output != "" {
		t.Errorf("rc %d output %q, want 1 and empty", got.RC(), got.Output)
	}
}

func TestFromEnv(t *testing.T) {
	tests := []struct {
		name      string
		env       map[string]string
		wantURL   string
		wantToken string
	}{
		{"primary", map[string]string{"GATEWAY_URL": "http://a", "MODAL_GATEWAY_URL": "http://b", "GATEWAY_TOKEN": "t1", "TOOL_GATEWAY_USER_TOKEN": "t2"}, "http://a", "t1"},
		{"modal fallback", map[string]string{"MODAL_GATEWAY_URL": "http://b", "TOOL_GATEWAY_USER_TOKEN": "t2"}, "http://b", "t2"},
		{"domain", map[string]string{"TOOL_GATEWAY_DOMAIN": "example.com"}, "https://modal-gateway.example.com", ""},
		{"domain and scheme", map[string]string{"TOOL_GATEWAY_DOMAIN": "example.com", "TOOL_GATEWAY_SCHEME": "http"}, "http://modal-gateway.example.com", ""},
		{"nothing", map[string]string{}, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u, tok := FromEnv(func(k string) string { return tt.env[k] })
			if u != tt.wantURL || tok != tt.wantToken {
				t.Errorf("FromEnv = %q, %q; want %q, %q", u, tok, tt.wantURL, tt.wantToken)
			}
		})
	}
}

func TestNewValidates(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no url", Config{Token: "t"}, "GATEWAY_URL"},
		{"bad url", Config{BaseURL: "ftp://x", Token: "t"}, "not an http(s) URL"},
		{"no token", Config{BaseURL: "http://x"}, "GATEWAY_TOKEN"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New error = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestTransportErrorHidesHost(t *testing.T) {
	c, err := New(Config{BaseURL: "http://user:pw@127.0.0.1:1", Token: testToken})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Create(context.Background(), "k", CreateRequest{})
	var te *TransportError
	if !errors.As(err, &te) || Classify(err) != Transient {
		t.Fatalf("Create to a closed port = %v, want a transient *TransportError", err)
	}
	if strings.Contains(err.Error(), "pw") || strings.Contains(err.Error(), testToken) {
		t.Errorf("error %q leaks credentials", err)
	}
}
