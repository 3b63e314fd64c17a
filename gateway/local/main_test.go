package local

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"go.uber.org/goleak"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/limits"
	"github.com/boxq/boxq/internal/syncbuf"
)

func TestMain(m *testing.M) {
	// The cgroup v1 tests start execs through the test binary as the shim.
	if limits.RunShim(os.Args) {
		return
	}
	goleak.VerifyTestMain(m)
}

// bwrapProbe is whether bubblewrap works on this machine, probed once.
var bwrapProbe = sync.OnceValue(func() error {
	dir, err := os.MkdirTemp("", "boxq-probe-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var user *owner
	if os.Geteuid() == 0 {
		user = &owner{uid: DefaultSandboxUID, gid: DefaultSandboxGID}
		if err := user.traversable(dir); err != nil {
			return err
		}
	}
	view, err := newHostView(slog.New(slog.DiscardHandler), dir, dir)
	if err != nil {
		return err
	}
	return probeBwrap(context.Background(), "bwrap", dir, user, view)
})

// eachIsolation runs f as a subtest per isolation mode; the bwrap one is
// skipped, with the reason, where bubblewrap does not work.
func eachIsolation(t *testing.T, f func(t *testing.T, mode Isolation)) {
	t.Helper()
	for _, mode := range []Isolation{IsolationNone, IsolationBwrap} {
		t.Run(string(mode), func(t *testing.T) {
			if mode == IsolationBwrap {
				requireBwrap(t)
			}
			f(t, mode)
		})
	}
}

func requireBwrap(t testing.TB) {
	t.Helper()
	if err := bwrapProbe(); err != nil {
		if os.Getenv("BOXQ_REQUIRE_BWRAP") == "1" {
			// CI: a skipped isolation probe would pass silently.
			t.Fatalf("bubblewrap does not work here (%v), and BOXQ_REQUIRE_BWRAP=1", err)
		}
		t.Skipf("bubblewrap does not work here: %v", err)
	}
}

// newStateDir returns a new directory for a state dir, removed at the end
// of the test. Not t.TempDir(): as root, bubblewrap runs as the sandbox
// user, who must be able to search every directory above the state dir,
// and t.TempDir()'s parent is private.
func newStateDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "boxq-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := removeTree(dir); err != nil {
			t.Errorf("remove state dir: %v", err)
		}
	})
	return dir
}

// testGateway is a Server behind a real HTTP server.
type testGateway struct {
	srv    *Server
	url    string
	token  string
	client *http.Client
	logs   *syncbuf.Buffer
}

// newGateway starts a server with cfg, filling in a token, a state dir, a
// fast janitor and a logger; the test's cleanup closes it and checks that
// the token never reached the logs.
func newGateway(t testing.TB, cfg Config) *testGateway {
	t.Helper()
	if cfg.Token == "" {
		cfg.Token = "tok-" + uuid.NewString()
	}
	if cfg.StateDir == "" {
		cfg.StateDir = newStateDir(t)
	}
	if cfg.JanitorInterval == 0 {
		cfg.JanitorInterval = 10 * time.Millisecond
	}
	if cfg.Isolation == "" {
		cfg.Isolation = IsolationNone
	}
	logs := &syncbuf.Buffer{}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	srv, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ts := httptest.NewServer(srv.Handler())
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
		if strings.Contains(logs.String(), cfg.Token) {
			t.Errorf("the token appears in the server's log")
		}
	})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
		ts.Close()
	})
	return &testGateway{srv: srv, url: ts.URL, token: cfg.Token, client: ts.Client(), logs: logs}
}

// response is an answer as the tests look at it.
type response struct {
	status int
	header http.Header
	body   []byte
}

// errorMessage returns the "error" of a JSON error body.
func (r response) errorMessage() string {
	var e gateway.ErrorBody
	_ = json.Unmarshal(r.body, &e)
	return e.Error
}

// send sends method path with body (nil: none; string or []byte: as is;
// else JSON) and the bearer token, unless auth says otherwise ("-": no
// Authorization header; else the header's value). It is safe to call
// from any goroutine.
func (g *testGateway) send(method, path string, body any, auth string, header ...string) (response, error) {
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			return response{}, err
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, g.url+path, rd)
	if err != nil {
		return response{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	switch auth {
	case "":
		req.Header.Set("Authorization", "Bearer "+g.token)
	case "-":
	default:
		req.Header.Set("Authorization", auth)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := g.client.Do(req)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: read body: %w", method, path, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: data}, nil
}

// request is send that fails the test on a transport error.
func (g *testGateway) request(t testing.TB, method, path string, body any, auth string, header ...string) response {
	t.Helper()
	r, err := g.send(method, path, body, auth, header...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// do is request with the right token.
func (g *testGateway) do(t testing.TB, method, path string, body any, header ...string) response {
	t.Helper()
	return g.request(t, method, path, body, "", header...)
}

// decode checks that r has status want and decodes its JSON body into v.
func decode(t testing.TB, what string, r response, want int, v any) {
	t.Helper()
	if r.status != want {
		t.Fatalf("%s: got status %d (%s), want %d", what, r.status, r.body, want)
	}
	if v != nil {
		if err := json.Unmarshal(r.body, v); err != nil {
			t.Fatalf("%s: decode %q: %v", what, r.body, err)
		}
	}
}

func (g *testGateway) create(t testing.TB, req gateway.CreateRequest, idemKey string) string {
	t.Helper()
	var header []string
	if idemKey != "" {
		header = []string{"x-idempotency-key", idemKey}
	}
	var resp gateway.CreateResponse
	decode(t, "create", g.do(t, "POST", "/v1/sandboxes", req, header...), http.StatusOK, &resp)
	if resp.ID == "" {
		t.Fatalf("create: got an empty id")
	}
	return resp.ID
}

func (g *testGateway) newSandbox(t testing.TB) string {
	t.Helper()
	return g.create(t, gateway.CreateRequest{}, "")
}

func (g *testGateway) start(t testing.TB, sb string, req gateway.StartRequest) gateway.ExecState {
	t.Helper()
	if req.ExecID == "" {
		req.ExecID = uuid.NewString()
	}
	var st gateway.ExecState
	decode(t, "start", g.do(t, "POST", "/v1/sandboxes/"+sb+"/execs", req), http.StatusOK, &st)
	if st.ExecID != req.ExecID {
		t.Fatalf("start: got execId %q, want %q", st.ExecID, req.ExecID)
	}
	return st
}

func (g *testGateway) poll(t testing.TB, sb, execID string, waitMs int) response {
	t.Helper()
	return g.do(t, "GET", fmt.Sprintf("/v1/sandboxes/%s/execs/%s?waitMs=%d", sb, execID, waitMs), nil)
}

// wait long-polls exec execID until it ends, for at most within.
func (g *testGateway) wait(t testing.TB, sb, execID string, within time.Duration) gateway.ExecState {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("exec %s still running after %v", execID, within)
		}
		var st gateway.ExecState
		decode(t, "poll", g.poll(t, sb, execID, int(min(left, 5*time.Second)/time.Millisecond)+1), http.StatusOK, &st)
		if gateway.Terminal(st.Status) {
			return st
		}
	}
}

// exec runs req in sb to its end.
func (g *testGateway) exec(t testing.TB, sb string, req gateway.StartRequest) gateway.ExecState {
	t.Helper()
	st := g.start(t, sb, req)
	if gateway.Terminal(st.Status) {
		return st
	}
	return g.wait(t, sb, st.ExecID, 20*time.Second)
}

// run runs command in sb to its end.
func (g *testGateway) run(t testing.TB, sb, command string) gateway.ExecState {
	t.Helper()
	return g.exec(t, sb, gateway.StartRequest{Command: command, TimeoutMs: 20_000})
}

// mustRun runs command in sb and fails the test unless it completes.
func (g *testGateway) mustRun(t testing.TB, sb, command string) string {
	t.Helper()
	st := g.run(t, sb, command)
	if st.Status != gateway.StatusCompleted {
		t.Fatalf("%q: got %s/%d %q, want completed", command, st.Status, st.RC(), st.Output)
	}
	return st.Output
}

// newMarker returns a string unique to this test, to find its processes by.
func newMarker() string { return "boxq-marker-" + uuid.NewString()[:8] }

// markerCommand runs a process whose argv[0] is marker, in the background
// of the exec's shell, and waits for it.
func markerCommand(marker string) string {
	return fmt.Sprintf("(exec -a %s sleep 30) & wait", marker)
}

// markerPIDs returns the live processes whose command line holds marker.
// Zombies have an empty command line and do not count: they are dead.
func markerPIDs(t testing.TB, marker string) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatalf("read /proc: %v", err)
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(marker)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// waitFor checks cond until it holds, for at most within.
func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not so after %v", what, within)
		}
		<-tick.C
	}
}

// waitMarker waits until marker's processes exist (up == true) or are gone.
func waitMarker(t testing.TB, marker string, up bool, within time.Duration) {
	t.Helper()
	what := "processes of " + marker + " gone"
	if up {
		what = "processes of " + marker + " running"
	}
	waitFor(t, within, what, func() bool { return (len(markerPIDs(t, marker)) > 0) == up })
}
