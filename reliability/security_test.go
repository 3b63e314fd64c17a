package reliability

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
)

// requireBwrap skips a test where bubblewrap does not work, unless
// BOXQ_REQUIRE_BWRAP=1 (CI) makes that a failure.
func requireBwrap(t *testing.T) {
	t.Helper()
	err := exec.Command("bwrap", "--ro-bind", "/", "/", "--unshare-all", "--", "true").Run()
	if err == nil {
		return
	}
	if os.Getenv("BOXQ_REQUIRE_BWRAP") == "1" {
		t.Fatalf("bubblewrap does not work here (%v), and BOXQ_REQUIRE_BWRAP=1", err)
	}
	t.Skipf("bubblewrap does not work here: %v", err)
}

// secrets collects text and reports where a secret appears in it.
type secrets struct {
	values []string // the secrets: never to be seen
	mu     sync.Mutex
	seen   []string // where they were seen
	texts  int
	bytes  int
}

func (s *secrets) check(where, text string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.texts++
	s.bytes += len(text)
	for _, v := range s.values {
		if i := strings.Index(text, v); i >= 0 {
			s.seen = append(s.seen, fmt.Sprintf("%s: …%s…", where, text[max(0, i-80):min(len(text), i+len(v)+40)]))
		}
	}
}

// TestNoSecretLeaks runs workers and the gateway with debug logging,
// through a batch that succeeds, fails, times out and rides out a gateway
// restart, plus a worker given a wrong token, and then searches everything
// they left for the gateway token and the Redis password: every log line,
// every result, /metrics, /healthz, the dashboard and its API, and every
// key and value in Redis (asynq's task payloads and server records
// included).
func TestNoSecretLeaks(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	if srv.Embedded() {
		t.Skip("needs a real redis-server: the embedded fallback cannot require a password (install redis-server)")
	}
	password := "redis-pw-" + uuid.NewString()
	httpToken := "http-token-" + uuid.NewString()
	admin := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	if err := admin.ConfigSet(context.Background(), "requirepass", password).Err(); err != nil {
		t.Fatal(err)
	}
	admin.Close()
	c := newCluster(t, clusterOptions{redis: srv, redisPassword: password,
		gateway: gatewayOptions{logLevel: "debug", isolation: "auto"},
		workers: workerOptions{logLevel: "debug", extra: []string{"-http", "127.0.0.1:0"}, env: []string{"BOXQ_HTTP_TOKEN=" + httpToken}}})
	s := &secrets{values: []string{c.gw.token, password, httpToken}}

	w1 := c.startWorker(t)
	// A worker given the token by flag rather than the environment.
	c.wo.extra = append(c.wo.extra, "-token", c.gw.token)
	c.startWorker(t)

	// A worker with a wrong token fails at start, and says so, without
	// either token.
	wrong := "wrong-" + uuid.NewString()
	s.values = append(s.values, wrong)
	bad := startProc(t, "worker-wrong-token", binary(t, "worker"),
		[]string{"-redis", c.redisURL, "-gateway", c.gw.url, "-log-level", "debug", "-log-format", "json"},
		append(cleanEnv(), "GATEWAY_TOKEN="+wrong))
	if err := bad.waitExit(30 * time.Second); err == nil {
		t.Errorf("a worker with a wrong token started")
	}
	if out := bad.logs.String(); !strings.Contains(out, "rejected the token") {
		t.Errorf("the worker with a wrong token did not say why it stopped:\n%s", out)
	}

	js := []jobs.Job{
		{ID: "sec-ok", TaskID: "sec-1", Command: "echo fine"},
		{ID: "sec-fail", TaskID: "sec-2", Command: "echo oops >&2; exit 3"},
		{ID: "sec-timeout", TaskID: "sec-3", Command: "sleep 10", TimeoutS: ptr(0.5)},
		{ID: "sec-env", TaskID: "sec-4", Command: "env; cat /proc/self/environ"},
		{ID: "sec-slow", TaskID: "sec-5", Command: "sleep 3; echo slow"},
	}
	b := c.enqueue(t, js)
	// Kill the gateway under a running command: retries, transport errors
	// and 404s get logged.
	waitFor(t, 30*time.Second, "a command to be running at the gateway", func() bool {
		live, err := c.gw.live(context.Background())
		if err != nil {
			return false
		}
		for _, sb := range live {
			if sb.RunningExecs > 0 {
				return true
			}
		}
		return false
	})
	c.gw.signal(syscall.SIGKILL)
	<-c.gw.done
	c.gw.start(t, nil)
	b.collect(t, 2*time.Minute, nil)
	b2 := c.enqueue(t, []jobs.Job{{ID: "sec-after", TaskID: "sec-5", Command: "echo after"}})
	b2.collect(t, time.Minute, nil)

	for id, r := range merge(b, b2).got {
		raw, _ := json.Marshal(r)
		s.check("result of "+id, string(raw))
	}

	// The worker's HTTP endpoints.
	addr := httpAddr(t, w1)
	paths := []string{"/metrics", "/healthz", "/monitoring/", "/monitoring/api/queues", "/monitoring/api/queue_stats",
		"/monitoring/api/servers", "/monitoring/api/redis_info", "/monitoring/api/scheduler_entries",
		"/monitoring/api/queues/default", "/monitoring/api/queues/default/groups"}
	for _, state := range []string{"active", "pending", "scheduled", "retry", "archived", "completed"} {
		paths = append(paths, "/monitoring/api/queues/default/"+state+"_tasks")
	}
	for _, j := range js {
		paths = append(paths, "/monitoring/api/queues/default/tasks/"+url.PathEscape(j.ID))
	}
	for _, p := range paths {
		body, status := get(t, "http://"+addr+p, httpToken)
		if status != http.StatusOK {
			t.Errorf("GET %s: %d", p, status)
		}
		s.check("GET "+p, body)
	}

	// Everything in Redis.
	dumpRedis(t, c.rdb, s)

	// Every log line of every process.
	for _, p := range append(c.allProcs(), bad) {
		s.check("log of "+p.name, p.logs.String())
	}
	for _, p := range c.gw.all {
		s.check("log of "+p.name, p.logs.String())
	}

	t.Logf("searched %d texts, %.1f MB, for the token and the password", s.texts, float64(s.bytes)/1e6)
	for _, where := range s.seen {
		t.Errorf("a secret appears in %s", where)
	}
	if s.bytes < 50_000 {
		t.Errorf("only %d bytes searched: debug logging did not produce much, the search proved little", s.bytes)
	}
}

// httpAddr returns the address a worker serves its HTTP endpoints on, as
// it logged it.
func httpAddr(t *testing.T, p *proc) string {
	t.Helper()
	for _, l := range p.logs.Lines() {
		var e struct {
			Msg  string `json:"msg"`
			Addr string `json:"addr"`
		}
		if json.Unmarshal([]byte(l), &e) == nil && strings.HasPrefix(e.Msg, "serving metrics") {
			return e.Addr
		}
	}
	t.Fatalf("%s did not log its HTTP address", p.name)
	return ""
}

// get fetches u with token as a bearer token ("" none).
func get(t *testing.T, u, token string) (string, int) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	return string(b), resp.StatusCode
}

// dumpRedis checks every key and value of the database.
func dumpRedis(t *testing.T, rdb *redis.Client, s *secrets) {
	t.Helper()
	ctx := context.Background()
	keys, err := rdb.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		s.check("a Redis key", k)
		var v any
		switch typ := rdb.Type(ctx, k).Val(); typ {
		case "string":
			v, err = rdb.Get(ctx, k).Result()
		case "hash":
			v, err = rdb.HGetAll(ctx, k).Result()
		case "list":
			v, err = rdb.LRange(ctx, k, 0, -1).Result()
		case "set":
			v, err = rdb.SMembers(ctx, k).Result()
		case "zset":
			v, err = rdb.ZRangeWithScores(ctx, k, 0, -1).Result()
		case "stream":
			v, err = rdb.XRange(ctx, k, "-", "+").Result()
		case "none":
			continue
		default:
			t.Errorf("Redis key %s has type %s, not searched", k, typ)
			continue
		}
		if err != nil && err != redis.Nil {
			t.Fatalf("read %s: %v", k, err)
		}
		s.check("Redis key "+k, fmt.Sprint(v))
	}
	if len(keys) < 10 {
		t.Errorf("only %d Redis keys: the search proved little", len(keys))
	}
}

// TestGatewayAuth checks that the reference gateway (the process) refuses
// every API call without the right bearer token: missing, wrong, a prefix
// or an extension of the right one, another scheme. (The comparison is in
// constant time: gateway/local's authed hashes both tokens with SHA-256 and
// compares the sums with crypto/subtle.ConstantTimeCompare.)
func TestGatewayAuth(t *testing.T) {
	t.Parallel()
	g := startGateway(t, gatewayOptions{})
	ctx := context.Background()
	sb, err := g.client.Create(ctx, "auth-key", gateway.CreateRequest{Image: gateway.DefaultImage, Cwd: gateway.DefaultCwd,
		CPU: 1, MemoryMiB: 512, TimeoutMs: 600_000, IdleTimeoutMs: 600_000})
	if err != nil {
		t.Fatal(err)
	}
	calls := []struct{ method, path, body string }{
		{"POST", "/v1/sandboxes", `{"image":"x"}`},
		{"GET", "/v1/sandboxes", ""},
		{"POST", "/v1/sandboxes/" + sb + "/execs", `{"execId":"e1","command":"touch /tmp/ran","timeoutMs":1000}`},
		{"GET", "/v1/sandboxes/" + sb + "/execs/e1", ""},
		{"POST", "/v1/sandboxes/" + sb + "/execs/e1/cancel", ""},
		{"POST", "/v1/sandboxes/" + sb + "/terminate", `{}`},
		{"GET", "/v1/nothing-here", ""},
	}
	auths := map[string]string{
		"missing":        "",
		"empty bearer":   "Bearer ",
		"wrong":          "Bearer wrong-" + uuid.NewString(),
		"prefix":         "Bearer " + g.token[:len(g.token)-1],
		"extended":       "Bearer " + g.token + "x",
		"other scheme":   "Basic " + g.token,
		"no scheme":      g.token,
		"padded":         "Bearer  " + g.token,
		"token as query": "",
	}
	for name, auth := range auths {
		for _, call := range calls {
			req, err := http.NewRequest(call.method, g.url+call.path, strings.NewReader(call.body))
			if err != nil {
				t.Fatal(err)
			}
			if name == "token as query" {
				req.URL.RawQuery = "token=" + url.QueryEscape(g.token) + "&access_token=" + url.QueryEscape(g.token)
			}
			if auth != "" {
				req.Header.Set("Authorization", auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("%s token, %s %s: %d %s; want 401", name, call.method, call.path, resp.StatusCode, body)
			}
			if strings.Contains(string(body), g.token) {
				t.Errorf("%s token, %s %s: the answer holds the token: %s", name, call.method, call.path, body)
			}
		}
	}
	// Nothing of the refused calls happened: the sandbox is the only one,
	// still live, and its exec never ran.
	live, err := g.live(ctx)
	if err != nil || len(live) != 1 || live[0].ID != sb || live[0].RunningExecs != 0 {
		t.Errorf("after refused calls: %+v, %v; want only sandbox %s, idle", live, err, sb)
	}
	if _, err := g.client.PollExec(ctx, sb, "e1", 0); err == nil {
		t.Errorf("exec e1 exists: a refused start ran")
	}
}

// TestSandboxIsolation runs probes through the whole pipeline, in a
// sandbox of the reference gateway under bubblewrap, next to another
// task's sandbox that runs a process and holds a secret file: a command
// sees neither the gateway's environment (its token included) nor the
// host's home, cannot write outside its sandbox, cannot reach the network
// (not even the gateway or Redis on loopback), and cannot see another
// sandbox's processes or files.
func TestSandboxIsolation(t *testing.T) {
	t.Parallel()
	requireBwrap(t)
	canary := "canary-" + uuid.NewString()
	c := newCluster(t, clusterOptions{gateway: gatewayOptions{isolation: "bwrap", env: []string{"BOXQ_CANARY=" + canary}}})
	c.startWorker(t)

	// Secrets of the host: a file in the host's home, one in another
	// user's home.
	hostHome, err := os.UserHomeDir()
	if err != nil {
		t.Fatal(err)
	}
	hostSecret := filepath.Join(hostHome, "boxq-secret-"+uuid.NewString())
	if err := os.WriteFile(hostSecret, []byte(canary), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(hostSecret) })
	otherHome := filepath.Join("/home", "boxq-user-"+uuid.NewString()[:8])
	if err := os.MkdirAll(otherHome, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(otherHome) })
	otherSecret := filepath.Join(otherHome, "secret")
	if err := os.WriteFile(otherSecret, []byte(canary), 0o644); err != nil {
		t.Fatal(err)
	}
	escape := "boxq-escape-" + uuid.NewString()

	// The other sandbox: a secret file and a running process.
	victimMarker := "victim-" + uuid.NewString()
	victim := c.enqueue(t, []jobs.Job{{ID: "victim-setup", TaskID: "victim", Command: "echo " + canary + " > ~/secret"}})
	victim.collect(t, time.Minute, nil)
	c.enqueue(t, []jobs.Job{{ID: "victim-run", TaskID: "victim", Command: "sleep 60 # " + victimMarker, TimeoutS: ptr(90.0)}})
	waitFor(t, 30*time.Second, "the victim's process", func() bool {
		live, err := c.gw.live(context.Background())
		if err != nil {
			return false
		}
		for _, sb := range live {
			if sb.LogicalKey == "victim" && sb.RunningExecs == 1 {
				return true
			}
		}
		return false
	})

	_, redisPort, _ := strings.Cut(strings.TrimPrefix(c.redisURL, "redis://"), ":")
	redisPort, _, _ = strings.Cut(redisPort, "/")
	_, gwPort, _ := strings.Cut(c.gw.addr, ":")
	probes := []struct {
		name    string
		command string
		leaked  func(out string) bool
	}{
		{"the gateway's environment", "env; tr '\\0' '\\n' < /proc/self/environ; tr '\\0' '\\n' < /proc/1/environ",
			func(out string) bool {
				return strings.Contains(out, canary) || strings.Contains(out, c.gw.token) || strings.Contains(out, "GATEWAY_TOKEN")
			}},
		{"other processes' environments and command lines", "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/environ; tr '\\0' ' ' < $p/cmdline; echo; done 2>/dev/null; true",
			func(out string) bool {
				return strings.Contains(out, canary) || strings.Contains(out, c.gw.token) || strings.Contains(out, victimMarker)
			}},
		{"the host's home", fmt.Sprintf("cat %s 2>&1; ls -a %s 2>&1", hostSecret, hostHome),
			func(out string) bool {
				return strings.Contains(out, canary) || strings.Contains(out, filepath.Base(hostSecret)+"\n")
			}},
		{"another user's home", fmt.Sprintf("cat %s 2>/dev/null; ls /home 2>/dev/null; true", otherSecret),
			func(out string) bool {
				return strings.Contains(out, canary) || strings.Contains(out, filepath.Base(otherHome))
			}},
		{"another sandbox's files", fmt.Sprintf("ls -R %s 2>&1 | head -50; cat /root/secret 2>&1", c.gw.stateDir),
			func(out string) bool { return strings.Contains(out, canary) || strings.Contains(out, "sandboxes") }},
		// The host's /root is the sandbox's own home inside: writing there
		// is fine, as long as it does not reach the host (checked below).
		{"writing outside the sandbox",
			fmt.Sprintf("for d in /usr /etc /var/tmp /opt %s %s; do touch $d/%s 2>/dev/null && echo wrote $d; done; true", hostHome, c.gw.stateDir, escape),
			func(out string) bool {
				return strings.Contains(strings.ReplaceAll(out, "wrote /root\n", ""), "wrote")
			}},
		{"the gateway on loopback", fmt.Sprintf("(echo > /dev/tcp/127.0.0.1/%s) 2>&1 && echo connected", gwPort),
			func(out string) bool { return strings.Contains(out, "connected") }},
		{"Redis on loopback", fmt.Sprintf("(echo > /dev/tcp/127.0.0.1/%s) 2>&1 && echo connected", redisPort),
			func(out string) bool { return strings.Contains(out, "connected") }},
		{"the network", "(echo > /dev/tcp/1.1.1.1/53) 2>&1 && echo connected; (echo > /dev/tcp/8.8.8.8/443) 2>&1 && echo connected; true",
			func(out string) bool { return strings.Contains(out, "connected") }},
		{"its own files, as a control", "echo mine > ~/f; echo mine > /tmp/f; cat ~/f /tmp/f",
			func(out string) bool { return out != "mine\nmine\n" }},
	}
	var js []jobs.Job
	for i, p := range probes {
		js = append(js, jobs.Job{ID: fmt.Sprintf("probe-%d", i), TaskID: "prober", Command: p.command})
	}
	b := c.enqueue(t, js)
	b.collect(t, 2*time.Minute, nil)
	for i, p := range probes {
		r := b.got[fmt.Sprintf("probe-%d", i)]
		if r.Status != jobs.StatusCompleted {
			t.Errorf("%s: %s %s", p.name, r.Status, r.Error)
			continue
		}
		if p.leaked(r.Output) {
			t.Errorf("%s: reached what it must not: %.2000q", p.name, r.Output)
		} else {
			t.Logf("%s: %.300q", p.name, r.Output)
		}
	}
	for _, d := range []string{"/usr", "/etc", "/var/tmp", "/opt", hostHome, c.gw.stateDir} {
		if _, err := os.Stat(filepath.Join(d, escape)); err == nil {
			t.Errorf("a sandbox wrote %s", filepath.Join(d, escape))
			os.Remove(filepath.Join(d, escape))
		}
	}
}
