package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(redistest.Wrap(m),
		goleak.IgnoreTopFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).reaper"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
	)
}

// TestRoutesMatchOpenAPI: the routes the API serves and the routes its
// OpenAPI document lists are the same set, and each documented route
// reaches its own handler (not the catch-all 404).
func TestRoutesMatchOpenAPI(t *testing.T) {
	var doc struct {
		OpenAPI string                                `json:"openapi"`
		Paths   map[string]map[string]json.RawMessage `json:"paths"`
	}
	if err := json.Unmarshal(openAPI, &doc); err != nil {
		t.Fatalf("openapi.json: %v", err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Errorf("openapi = %q; want an OpenAPI 3 document", doc.OpenAPI)
	}
	var documented, served []string
	for path, ops := range doc.Paths {
		for method := range ops {
			documented = append(documented, strings.ToUpper(method)+" "+path)
		}
	}
	for _, rt := range routes {
		served = append(served, rt.method+" "+rt.path)
	}
	slices.Sort(documented)
	slices.Sort(served)
	if !slices.Equal(documented, served) {
		t.Errorf("routes documented:\n  %s\nroutes served:\n  %s", strings.Join(documented, "\n  "), strings.Join(served, "\n  "))
	}

	mux := (&server{}).handler().(*http.ServeMux)
	for _, r := range documented {
		method, path, _ := strings.Cut(r, " ")
		concrete := strings.NewReplacer("{id}", "job-1", "{task}", "task-1", "{name}", "sched-1").Replace(path)
		req := httptest.NewRequest(method, concrete, nil)
		if _, pattern := mux.Handler(req); pattern != r {
			t.Errorf("%s %s reaches %q; want the route %q", method, concrete, pattern, r)
		}
	}
}

// apiStack is a real Redis (a dedicated server, so that its client count
// is this test's), the reference gateway, and the API's handler on an
// httptest server. startWorker adds a worker.
type apiStack struct {
	rdb      *redis.Client
	redisURL string
	gwURL    string
	api      *server
	url      string
}

const gwToken = "api-test-gateway-token"

func newAPIStack(t *testing.T, token string) *apiStack {
	t.Helper()
	srv := redistest.StartServer(t)
	url := srv.URL(0)
	ctx := context.Background()
	rdb, err := connectRedis(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	gw, err := local.New(local.Config{Token: gwToken, Isolation: local.IsolationNone})
	if err != nil {
		t.Fatal(err)
	}
	gwSrv := httptest.NewServer(gw.Handler())
	t.Cleanup(func() {
		gwSrv.Close()
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = gw.Close(cctx)
	})
	s, err := newServer(ctx, rdb, jobs.ProducerConfig{Sweep: 200 * time.Millisecond}, token, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.hub.Close() })
	h := httptest.NewServer(s.handler())
	t.Cleanup(h.Close)
	return &apiStack{rdb: rdb, redisURL: url, gwURL: gwSrv.URL, api: s, url: h.URL}
}

func (st *apiStack) startWorker(t *testing.T) { st.startWorkerEvery(t, time.Minute) }

// startWorkerEvery starts a worker that reaps, and reads the schedules
// again, every reapEvery.
func (st *apiStack) startWorkerEvery(t *testing.T, reapEvery time.Duration) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready, done := make(chan struct{}), make(chan error, 1)
	go func() {
		done <- app.RunWorker(ctx, app.WorkerOptions{RedisURL: st.redisURL, GatewayURL: st.gwURL, Token: gwToken,
			Concurrency: 32, ShutdownTimeout: 2 * time.Second, ReapEvery: reapEvery, IdleTTL: time.Minute,
			OnReady: func(string) { close(ready) }})
	}()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("worker: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// do sends a request and decodes the JSON answer into v (when not nil).
func do(t *testing.T, c *http.Client, method, url, token, body string, v any) int {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if v != nil {
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatalf("%s %s: %d %q: %v", method, url, resp.StatusCode, b, err)
		}
	}
	return resp.StatusCode
}

// TestAuthAndErrors: a wrong or missing token is 401 on every /v1 route
// but the document; a bad job is 400 with the CLI's words; an unknown job
// is 404; a body past the limit is 413; no token and a public address is
// refused at start.
func TestAuthAndErrors(t *testing.T) {
	st := newAPIStack(t, "s3cret")
	c := http.DefaultClient
	var e struct{ Error string }
	for _, rt := range routes {
		if rt.public {
			continue
		}
		path := strings.NewReplacer("{id}", "j", "{task}", "t", "{name}", "s").Replace(rt.path)
		for _, tok := range []string{"", "wrong"} {
			if code := do(t, c, rt.method, st.url+path, tok, "", &e); code != http.StatusUnauthorized || e.Error == "" {
				t.Errorf("%s %s with token %q: %d %q; want 401 with an error", rt.method, path, tok, code, e.Error)
			}
		}
	}
	if code := do(t, c, "GET", st.url+"/v1/openapi.json", "", "", nil); code != http.StatusOK {
		t.Errorf("openapi.json without a token: %d; want 200", code)
	}
	if code := do(t, c, "POST", st.url+"/v1/jobs", "s3cret", `{"task_id":"t","command":"x","Command":"y"}`, &e); code != http.StatusBadRequest ||
		!strings.HasPrefix(e.Error, "invalid job: ") {
		t.Errorf("bad job: %d %q; want 400 invalid job", code, e.Error)
	}
	if _, err := jobs.ParseJob([]byte(`{"task_id":"t"}`)); err == nil || do(t, c, "POST", st.url+"/v1/jobs", "s3cret", `{"task_id":"t"}`, &e) != 400 || e.Error != err.Error() {
		t.Errorf("a job without a command: %q; want the CLI's words %v", e.Error, err)
	}
	if code := do(t, c, "GET", st.url+"/v1/jobs/no-such-job", "s3cret", "", &e); code != http.StatusNotFound {
		t.Errorf("unknown job: %d %q; want 404", code, e.Error)
	}
	if code := do(t, c, "POST", st.url+"/v1/jobs/no-such-job/cancel", "s3cret", "", &e); code != http.StatusNotFound {
		t.Errorf("cancel of an unknown job: %d %q; want 404", code, e.Error)
	}
	if code := do(t, c, "GET", st.url+"/v1/tasks/no-such-task", "s3cret", "", &e); code != http.StatusNotFound {
		t.Errorf("unknown task: %d %q; want 404", code, e.Error)
	}
	big := `{"task_id":"t","command":"` + strings.Repeat("x", maxJobBytes) + `"}`
	if code := do(t, c, "POST", st.url+"/v1/jobs", "s3cret", big, &e); code != http.StatusRequestEntityTooLarge {
		t.Errorf("a body past the limit: %d %q; want 413", code, e.Error)
	}
	if code := do(t, c, "GET", st.url+"/v1/jobs/x?wait=forever", "s3cret", "", &e); code != http.StatusBadRequest {
		t.Errorf("wait=forever: %d %q; want 400", code, e.Error)
	}

	var out bytes.Buffer
	err := run(context.Background(), []string{"-addr", "0.0.0.0:0", "-redis", st.redisURL}, func(string) string { return "" }, &out, &out)
	if err == nil || !strings.Contains(err.Error(), "token") {
		t.Errorf("no token on 0.0.0.0: %v; want a refusal that asks for a token", err)
	}
}

// TestLongPollsShareOneSubscriber: 1,000 clients long-polling 1,000 jobs
// at once hold no more Redis connections than the API's pool and its one
// subscriber, and each gets its result when the jobs run. The count is
// logged (docs/PERFORMANCE.md).
func TestLongPollsShareOneSubscriber(t *testing.T) {
	const n, tasks = 1000, 20
	st := newAPIStack(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	clients := func() int {
		info, err := st.rdb.Info(ctx, "clients").Result()
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.Lines(info) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "connected_clients:"); ok {
				k, _ := strconv.Atoi(v)
				return k
			}
		}
		t.Fatalf("no connected_clients in %q", info)
		return 0
	}

	ids := make([]string, n)
	for i := range ids {
		var e enqueuedJSON
		body := fmt.Sprintf(`{"task_id":"lp-%d","command":"true"}`, i%tasks)
		if code := do(t, http.DefaultClient, "POST", st.url+"/v1/jobs", "", body, &e); code != http.StatusAccepted {
			t.Fatalf("enqueue: %d", code)
		}
		ids[i] = e.ID
	}
	before := clients()

	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n}}
	defer hc.CloseIdleConnections()
	var wg sync.WaitGroup
	codes := make([]int, n)
	results := make([]jobs.Result, n)
	for i, id := range ids {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, "GET", st.url+"/v1/jobs/"+id+"?wait=90s", nil)
			resp, err := hc.Do(req)
			if err != nil {
				t.Errorf("long poll %d: %v", i, err)
				return
			}
			defer resp.Body.Close()
			codes[i] = resp.StatusCode
			_ = json.NewDecoder(resp.Body).Decode(&results[i])
		})
	}
	deadline := time.Now().Add(60 * time.Second)
	for st.api.hub.Awaited() < n {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d long polls are waiting after 60s", st.api.hub.Awaited(), n)
		}
		time.Sleep(20 * time.Millisecond) // observing another party: the HTTP clients
	}
	during := clients()
	// go-redis's ceiling: the main pool, its separate pipeline pool, and
	// the subscriber's connection.
	ceiling := redisPoolSize + redis.DefaultPipelinePoolSize + 1
	t.Logf("Redis clients: %d before the long polls, %d with %d long polls waiting (ceiling %d: pool %d + pipeline pool %d + subscriber)",
		before, during, n, ceiling, redisPoolSize, redis.DefaultPipelinePoolSize)
	if during > ceiling {
		t.Errorf("%d Redis clients with %d long polls; want at most %d", during, n, ceiling)
	}

	st.startWorker(t)
	wg.Wait()
	for i := range ids {
		if codes[i] != http.StatusOK || results[i].ID != ids[i] || results[i].Status != jobs.StatusCompleted {
			t.Fatalf("long poll %d: %d %+v; want 200 with its completed result", i, codes[i], results[i])
		}
	}
}
