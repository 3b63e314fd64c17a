package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
)

// demoBatch is the example batch, as the compose file's enqueue service and
// the README run it.
var demoBatch = filepath.Join(repoRoot, "examples", "demo.jsonl")

// Bounds of the end-to-end steps: generous, for a loaded CI machine with
// race-instrumented programs; a healthy run takes a few seconds.
const (
	startLimit = 30 * time.Second // until a program answers /healthz
	batchLimit = 90 * time.Second // the example batch, start to last result
	stopLimit  = 20 * time.Second // from SIGTERM to exit, with no job running
)

// TestStack runs the services of docker-compose.yml as local processes: a
// real redis-server with the compose file's arguments, the gateway and two
// workers with the compose file's commands (their addresses and state dir
// made local), and the example batch through the enqueue service's command.
// It checks every result, the workers' metrics, health and dashboard, the
// compose health checks, and that everything stops cleanly on SIGTERM.
func TestStack(t *testing.T) {
	c := loadCompose(t, composeFile)
	binaries(t) // build before starting anything with a deadline

	rs := c.service(t, svcRedis)
	srv := redistest.StartServer(t, rs.Command[1:]...)
	redisURL := srv.URL(0)

	token, httpToken := randomToken(t), randomToken(t)
	env := func(s service) map[string]string {
		out := map[string]string{}
		for k, v := range s.Environment {
			out[k] = interpolate(v, func(name string) string {
				switch name {
				case "GATEWAY_TOKEN":
					return token
				case "BOXQ_HTTP_TOKEN":
					return httpToken
				}
				return ""
			})
		}
		return out
	}

	gs := c.service(t, svcGateway)
	gwAddr := freeAddr(t)
	gwArgv := withFlag(t, gs.argv(), "addr", gwAddr)
	gwArgv = withFlag(t, gwArgv, "state-dir", t.TempDir())
	gw := start(t, svcGateway, gwArgv, env(gs))
	waitHealthy(t, gw, gwAddr, startLimit)
	checkHealthcheck(t, gs, gwAddr)
	if env(gs)["GATEWAY_TOKEN"] != token {
		t.Fatalf("gateway token %q, want the test's", env(gs)["GATEWAY_TOKEN"])
	}

	type worker struct {
		*proc
		addr string
	}
	var workers []worker
	for _, name := range svcWorkers {
		ws := c.service(t, name)
		addr := freeAddr(t)
		e := env(ws)
		e["REDIS_URL"] = redisURL
		e["GATEWAY_URL"] = "http://" + gwAddr
		p := start(t, name, withFlag(t, ws.argv(), "http", addr), e)
		workers = append(workers, worker{p, addr})
	}
	for _, w := range workers {
		waitHealthy(t, w.proc, w.addr, startLimit)
		checkHealthcheck(t, c.service(t, w.name), w.addr)
	}
	before := scrapeAll(t, workers[0].addr, workers[1].addr)

	es := c.service(t, svcEnqueue)
	batch, _ := flagValue(es.argv(), "f")
	local := filepath.Join(repoRoot, "examples", strings.TrimPrefix(batch, "/examples/"))
	e := env(es)
	e["REDIS_URL"] = redisURL
	ctx, cancel := context.WithTimeout(context.Background(), batchLimit)
	stdout, stderr, code := run(ctx, t, withFlag(t, es.argv(), "f", local), e)
	cancel()
	if code != 0 {
		t.Fatalf("enqueue exited %d, want 0\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	bwrap := strings.Contains(gw.out.String(), "isolation: bwrap")
	if os.Getenv("BOXQ_REQUIRE_BWRAP") == "1" && !bwrap {
		t.Errorf("the gateway did not pick bwrap (BOXQ_REQUIRE_BWRAP=1); its log:\n%s", gw.out.String())
	}
	results := checkDemo(t, stdout, bwrap)

	t.Run("metrics", func(t *testing.T) {
		after := scrapeAll(t, workers[0].addr, workers[1].addr)
		for _, w := range workers {
			t.Logf("%s after the batch:\n%s", w.name, interesting(scrape(t, w.addr)))
		}
		byStatus := map[string]float64{}
		for _, r := range results {
			byStatus[r.Status]++
		}
		for _, status := range []string{jobs.StatusCompleted, jobs.StatusTimeout, jobs.StatusCancelled, jobs.StatusError} {
			series := fmt.Sprintf(`boxq_results_total{status=%q}`, status)
			if got, want := after[series]-before[series], byStatus[status]; got != want {
				t.Errorf("%s went up by %v over both workers, want %v", series, got, want)
			}
		}
		for _, series := range []string{"boxq_job_end_to_end_seconds_count", "boxq_exec_run_seconds_count"} {
			if got, want := after[series]-before[series], float64(len(results)); got != want {
				t.Errorf("%s went up by %v over both workers, want %v", series, got, want)
			}
		}
		// asynq's queue metrics come from Redis: each worker reports the
		// same numbers, so look at one.
		one := scrape(t, workers[0].addr)
		if _, ok := one[`asynq_queue_size{queue="default",state="pending"}`]; !ok {
			t.Errorf("no asynq_queue_size for the default queue; metrics:\n%s", names(one))
		}
		if got := one[`asynq_tasks_processed_today{queue="default"}`]; got < float64(len(results)) {
			t.Errorf("asynq_tasks_processed_today = %v, want at least %d", got, len(results))
		}
		if got := one["boxq_sandboxes_live"]; got < 1 {
			t.Errorf("boxq_sandboxes_live = %v, want the batch's sandboxes", got)
		}
		// A clean batch waits only for its tasks' turns: those are boxq's
		// own waits, never gateway errors.
		for _, class := range []string{"transient", "capacity", "permanent"} {
			series := fmt.Sprintf(`boxq_gateway_errors_total{class=%q}`, class)
			if got := after[series] - before[series]; got != 0 {
				t.Errorf("%s went up by %v in a clean batch, want 0", series, got)
			}
		}
		// Once per job, however often a job came back to wait for its turn.
		if got, want := after["boxq_queue_wait_seconds_count"]-before["boxq_queue_wait_seconds_count"], float64(len(results)); got != want {
			t.Errorf("boxq_queue_wait_seconds_count went up by %v over both workers, want %v (once per job)", got, want)
		}
	})

	t.Run("healthz", func(t *testing.T) {
		for _, w := range workers {
			for _, path := range []string{"/healthz", "/readyz"} {
				code, body, err := get(context.Background(), "http://"+w.addr+path)
				if err != nil || code != http.StatusOK || !strings.Contains(body, `"ok"`) {
					t.Errorf("%s %s: %d %q %v, want 200 ok", w.name, path, code, body, err)
				}
			}
		}
	})

	t.Run("dashboard", func(t *testing.T) {
		checkDashboard(t, workers[0].addr, httpToken, "default")
	})

	t.Run("api", func(t *testing.T) {
		as := c.service(t, svcAPI)
		addr := freeAddr(t)
		e := env(as)
		e["REDIS_URL"] = redisURL
		e["BOXQ_API_TOKEN"] = token
		api := start(t, svcAPI, withFlag(t, as.argv(), "addr", addr), e)
		waitHealthy(t, api, addr, startLimit)
		checkHealthcheck(t, as, addr)
		req, err := http.NewRequest("POST", "http://"+addr+"/v1/jobs?wait=60s", strings.NewReader(`{"task_id":"e2e-api","command":"cd /tmp && echo via api"}`))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var r jobs.Result
		err = json.NewDecoder(resp.Body).Decode(&r)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || r.Status != jobs.StatusCompleted || r.Output != "via api\n" || r.Cwd != "/tmp" {
			t.Errorf("POST /v1/jobs?wait: %d %+v %v; want 200 with the completed result", resp.StatusCode, r, err)
		}
		if code := api.stop(t, stopLimit); code != 0 {
			t.Errorf("api exited %d after SIGTERM, want 0\n%s", code, api.out.String())
		}
	})

	// SIGTERM, as `docker compose down` sends: the workers first, as
	// Compose stops dependents before what they depend on.
	for _, p := range []*proc{workers[0].proc, workers[1].proc, gw} {
		if code := p.stop(t, stopLimit); code != 0 {
			t.Errorf("%s exited %d after SIGTERM, want 0\n%s", p.name, code, p.out.String())
		}
	}
}

// TestDev runs the example batch with `enqueue -dev` alone: the binary,
// nothing else running.
func TestDev(t *testing.T) {
	binaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), batchLimit)
	defer cancel()
	stdout, stderr, code := run(ctx, t, []string{progEnqueue, "-dev", "-f", demoBatch, "-wait"}, nil)
	if code != 0 {
		t.Fatalf("enqueue -dev exited %d, want 0\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	checkDemo(t, stdout, isBwrapWorking())
}

// TestCommandLine checks each program's -h (exit 0, its purpose first) and
// a usage error (exit 2, with a pointer to -h).
func TestCommandLine(t *testing.T) {
	binaries(t)
	for _, p := range programs {
		t.Run(p, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			stdout, stderr, code := run(ctx, t, []string{p, "-h"}, nil)
			if code != 0 {
				t.Errorf("%s -h exited %d, want 0; stderr:\n%s", p, code, stderr)
			}
			first, _, _ := strings.Cut(stdout, "\n")
			if !strings.HasPrefix(first, p+" ") || len(first) < len(p)+20 {
				t.Errorf("%s -h begins %q, want its name and what it is for", p, first)
			}
			if !strings.Contains(stdout, "Flags:") {
				t.Errorf("%s -h lists no flags:\n%s", p, stdout)
			}

			stdout, stderr, code = run(ctx, t, []string{p, "-no-such-flag"}, nil)
			if code != 2 {
				t.Errorf("%s -no-such-flag exited %d, want 2", p, code)
			}
			if !strings.Contains(stderr, "-no-such-flag") || !strings.Contains(stderr, p+" -h") {
				t.Errorf("%s -no-such-flag: stderr %q, want the flag named and a pointer to -h", p, stderr)
			}
			if stdout != "" {
				t.Errorf("%s -no-such-flag wrote to stdout: %q", p, stdout)
			}
		})
	}
}

// demoWant is what each job of examples/demo.jsonl must end with. Jobs of
// one task run in file order, each where the one before left the cwd:
// demo-7 finds answer.py only in the directory demo-1 went to.
var demoWant = map[string]struct {
	status string
	rc     int
	output string
	cwd    string // "" = not checked
}{
	"demo-1": {jobs.StatusCompleted, 0, "answer.py\n", "/root/project"},
	"demo-2": {jobs.StatusCompleted, 0, "reading stdin\nSHOUT THIS\n", "/root"},
	"demo-3": {jobs.StatusCompleted, 3, "about to fail\n", "/root"},
	"demo-4": {jobs.StatusTimeout, 124, "sleeping\n", ""},
	"demo-5": {jobs.StatusCompleted, 0, "", "/tmp/scratch"},
	"demo-6": {jobs.StatusCompleted, 0, "3\n", ""},
	"demo-7": {jobs.StatusCompleted, 0, "print(6 * 7)\n", "/root/project"},
}

// checkDemo checks the result lines of the example batch and returns them.
// Under bubblewrap a sandbox's home is /root; without isolation it is a
// directory of the gateway's, so a cwd must only end the same way.
func checkDemo(t *testing.T, stdout string, bwrap bool) []jobs.Result {
	t.Helper()
	var results []jobs.Result
	seen := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(stdout))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r jobs.Result
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("result line %q: %v", sc.Text(), err)
		}
		if seen[r.ID] {
			t.Errorf("two results for %s", r.ID)
		}
		seen[r.ID] = true
		results = append(results, r)
	}
	if len(results) != len(demoWant) {
		t.Fatalf("%d result lines, want %d:\n%s", len(results), len(demoWant), stdout)
	}
	for _, r := range results {
		want, ok := demoWant[r.ID]
		if !ok {
			t.Errorf("result for unknown job %q", r.ID)
			continue
		}
		if r.Status != want.status || r.ReturnCode != want.rc || r.Output != want.output {
			t.Errorf("%s: %s, rc %d, output %q; want %s, rc %d, output %q (error %q)",
				r.ID, r.Status, r.ReturnCode, r.Output, want.status, want.rc, want.output, r.Error)
		}
		cwdOK := r.Cwd == want.cwd || (!bwrap && strings.HasSuffix(r.Cwd, want.cwd))
		if want.cwd != "" && !cwdOK {
			t.Errorf("%s: cwd %q, want %q (bwrap: %v)", r.ID, r.Cwd, want.cwd, bwrap)
		}
	}
	return results
}

// checkHealthcheck runs the service's compose health check, pointed at
// addr: it must pass against a healthy program.
func checkHealthcheck(t *testing.T, s service, addr string) {
	t.Helper()
	argv, _ := healthcheck(t, s, addr)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput(); err != nil {
		t.Errorf("compose health check %q against %s: %v\n%s", argv, addr, err, out)
	}
}

// isBwrapWorking reports whether bubblewrap isolates here, as the gateway's
// -isolation auto probe would find.
func isBwrapWorking() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := exec.CommandContext(ctx, "bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/",
		"--dev", "/dev", "--proc", "/proc", "true").Run()
	return err == nil
}

func randomToken(t *testing.T) string {
	t.Helper()
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b[:])
}

// scrape fetches addr's /metrics and returns every sample by its series,
// as written: name{label="value",...}.
func scrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	code, body, err := get(context.Background(), "http://"+addr+"/metrics")
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET %s/metrics: %d %v", addr, code, err)
	}
	out := map[string]float64{}
	for line := range strings.Lines(body) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Fatalf("metrics line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// scrapeAll sums the samples of several workers.
func scrapeAll(t *testing.T, addrs ...string) map[string]float64 {
	t.Helper()
	sum := map[string]float64{}
	for _, a := range addrs {
		for k, v := range scrape(t, a) {
			sum[k] += v
		}
	}
	return sum
}

// interesting returns boxq's samples (histograms by their counts only) and
// the default queue's, sorted, one "series value" a line.
func interesting(m map[string]float64) string {
	var lines []string
	for k, v := range m {
		boxq := strings.HasPrefix(k, "boxq_") && !strings.Contains(k, "_bucket") && !strings.HasSuffix(k, "_sum")
		if boxq || strings.Contains(k, `queue="default"`) {
			lines = append(lines, fmt.Sprintf("%s %g", k, v))
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

func names(m map[string]float64) string {
	var b strings.Builder
	for k := range m {
		b.WriteString(k + "\n")
	}
	return b.String()
}
