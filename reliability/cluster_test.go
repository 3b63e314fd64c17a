package reliability

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
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

// gatewayProc is the reference gateway, as a process of its own, so that
// it can be killed for real.
type gatewayProc struct {
	*proc
	addr      string
	url       string
	token     string
	stateDir  string
	isolation string
	logLevel  string
	// client talks to the gateway directly (no fault proxy), for checks.
	client *gateway.Client
	// all are the processes started, restarts included.
	all []*proc
}

type gatewayOptions struct {
	isolation string // default "none"; "bwrap" requires it to work
	logLevel  string // default "info"
	env       []string
}

// startGateway starts a reference gateway (cmd/gateway) on a free port
// with a state dir of its own.
func startGateway(t testing.TB, o gatewayOptions) *gatewayProc {
	t.Helper()
	g := &gatewayProc{
		addr:      freeAddr(t),
		token:     "tok-" + uuid.NewString(),
		stateDir:  t.TempDir(),
		isolation: cmp.Or(o.isolation, "none"),
		logLevel:  cmp.Or(o.logLevel, "info"),
	}
	g.url = "http://" + g.addr
	var err error
	g.client, err = gateway.New(gateway.Config{BaseURL: g.url, Token: g.token})
	if err != nil {
		t.Fatal(err)
	}
	g.start(t, o.env)
	return g
}

// start starts the gateway process (again, after a kill) and waits until
// it answers.
func (g *gatewayProc) start(t testing.TB, extraEnv []string) {
	t.Helper()
	args := []string{"-addr", g.addr, "-state-dir", g.stateDir, "-isolation", g.isolation,
		"-log-level", g.logLevel, "-log-format", "json"}
	env := append(cleanEnv(), "GATEWAY_TOKEN="+g.token)
	env = append(env, extraEnv...)
	g.proc = startProc(t, fmt.Sprintf("gateway#%d", len(g.all)+1), binary(t, "gateway"), args, env)
	g.all = append(g.all, g.proc)
	waitFor(t, 30*time.Second, "the gateway to answer", func() bool {
		if g.exited() {
			t.Fatalf("gateway exited at start: %v\n%s", g.err, g.logs.String())
		}
		resp, err := http.Get(g.url + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// live returns the gateway's live sandboxes.
func (g *gatewayProc) live(ctx context.Context) ([]gateway.SandboxInfo, error) {
	return g.client.List(ctx)
}

// cleanEnv is this process's environment without what would point a
// helper process somewhere else (gateway and Redis settings).
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case k == "REDIS_URL", k == "BOXQ_HTTP_TOKEN", strings.HasPrefix(k, "GATEWAY_"),
			strings.HasPrefix(k, "MODAL_"), strings.HasPrefix(k, "TOOL_GATEWAY_"):
			continue
		}
		env = append(env, kv)
	}
	return env
}

// workerOptions are the flags of the worker processes of a cluster.
type workerOptions struct {
	concurrency     int           // default 16
	idleTTL         time.Duration // default 3s
	reapEvery       time.Duration // default 1s
	shutdownTimeout time.Duration // default 1s
	logLevel        string        // default "info"
	extra           []string
	env             []string // added to the environment
}

// cluster is a Redis, a gateway process, worker processes and a producer.
type cluster struct {
	t        *testing.T
	rdb      *redis.Client
	redisURL string
	gw       *gatewayProc
	prod     *jobs.Producer
	wo       workerOptions

	mu      sync.Mutex
	workers []*proc
	started int
}

type clusterOptions struct {
	// redis, when set, is a dedicated server (database 0 of it is used);
	// default: a fresh database of the shared test server.
	redis *redistest.Srv
	// redisPassword is the password of the dedicated server.
	redisPassword string
	gateway       gatewayOptions
	workers       workerOptions
}

func newCluster(t *testing.T, o clusterOptions) *cluster {
	t.Helper()
	c := &cluster{t: t, wo: o.workers}
	if o.redis != nil {
		c.redisURL = o.redis.URL(0)
		if o.redisPassword != "" {
			c.redisURL = "redis://:" + url.QueryEscape(o.redisPassword) + "@" + o.redis.Addr() + "/0"
		}
		opt, err := redis.ParseURL(c.redisURL)
		if err != nil {
			t.Fatal(err)
		}
		c.rdb = redis.NewClient(opt)
		t.Cleanup(func() { c.rdb.Close() })
	} else {
		c.rdb, c.redisURL = redistest.New(t)
	}
	c.gw = startGateway(t, o.gateway)
	var err error
	c.prod, err = jobs.NewProducer(c.rdb, jobs.ProducerConfig{Sweep: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// workerArgs are the command line of a worker process.
func (c *cluster) workerArgs() []string {
	wo := c.wo
	args := []string{
		"-redis", c.redisURL, "-gateway", c.gw.url,
		"-concurrency", fmt.Sprint(cmp.Or(wo.concurrency, 16)),
		"-idle-ttl", cmp.Or(wo.idleTTL, 3*time.Second).String(),
		"-reap-every", cmp.Or(wo.reapEvery, time.Second).String(),
		"-shutdown-timeout", cmp.Or(wo.shutdownTimeout, time.Second).String(),
		"-log-format", "json", "-log-level", cmp.Or(wo.logLevel, "info"),
	}
	return append(args, wo.extra...)
}

// startWorker starts a worker process (cmd/worker) and waits until it
// serves.
func (c *cluster) startWorker(t testing.TB) *proc {
	t.Helper()
	c.mu.Lock()
	c.started++
	name := fmt.Sprintf("worker#%d", c.started)
	c.mu.Unlock()
	env := append(append(cleanEnv(), "GATEWAY_TOKEN="+c.gw.token), c.wo.env...)
	p := startProc(t, name, binary(t, "worker"), c.workerArgs(), env)
	if err := p.waitLog(60*time.Second, `"msg":"worker started"`); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.workers = append(c.workers, p)
	c.mu.Unlock()
	return p
}

// running returns the worker processes still running.
func (c *cluster) running() []*proc {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*proc
	for _, p := range c.workers {
		if !p.exited() {
			out = append(out, p)
		}
	}
	return out
}

// allProcs returns every worker process started.
func (c *cluster) allProcs() []*proc {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.workers)
}

// allLogs returns the log lines of every worker process started.
func (c *cluster) allLogs() []string {
	var out []string
	for _, p := range c.allProcs() {
		out = append(out, p.logs.Lines()...)
	}
	return out
}

// The command of every batch job: it notes that it ran (a line of its own
// in the task's runs.log, which outlives sandboxes as part of the task's
// snapshot), checks that no other command of its task runs at the same
// time (mkdir is atomic), sleeps, and prints a line that names it.
const jobScript = `mkdir ~/.busy 2>/dev/null || echo "overlap %[1]s" >> ~/overlap.log
echo "ran %[1]s $(date +%%s.%%N)" >> ~/runs.log
sleep %[2]s
rmdir ~/.busy 2>/dev/null
echo "done %[1]s"`

// makeBatch returns n jobs over tasks tasks (job i belongs to task
// i%tasks), each sleeping sleep seconds.
func makeBatch(prefix string, n, tasks int, sleep string) []jobs.Job {
	out := make([]jobs.Job, n)
	for i := range out {
		id := fmt.Sprintf("%s-j%03d", prefix, i)
		out[i] = jobs.Job{
			ID:       id,
			TaskID:   fmt.Sprintf("%s-t%02d", prefix, i%tasks),
			Command:  fmt.Sprintf(jobScript, id, sleep),
			TimeoutS: ptr(60.0),
		}
	}
	return out
}

// wantOutput is what a batch job prints.
func wantOutput(id string) string { return "done " + id + "\n" }

// batch is a set of enqueued jobs whose results are being collected.
type batch struct {
	jobs    []jobs.Job
	byID    map[string]jobs.Job
	started time.Time
	results chan jobs.Result
	errc    chan error
	cancel  context.CancelFunc
	done    chan struct{}

	got     map[string]jobs.Result
	arrived map[string]time.Time

	pubMu sync.Mutex
	pubs  map[string][]string // every result published, by job id
}

// enqueue enqueues js and collects their results in the background: as
// the producer sees them (Waiter), and every notification published on
// the waiter's channel (to check that a job never gets two different
// answers).
func (c *cluster) enqueue(t *testing.T, js []jobs.Job) *batch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	b := &batch{
		jobs: js, byID: map[string]jobs.Job{}, started: time.Now(),
		results: make(chan jobs.Result, len(js)), errc: make(chan error, 1),
		cancel: cancel, done: make(chan struct{}),
		got: map[string]jobs.Result{}, arrived: map[string]time.Time{},
		pubs: map[string][]string{},
	}
	w, err := c.prod.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ps := c.rdb.Subscribe(ctx, w.Channel())
	if _, err := ps.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for m := range ps.Channel() {
			var r jobs.Result
			if json.Unmarshal([]byte(m.Payload), &r) == nil {
				b.pubMu.Lock()
				b.pubs[r.ID] = append(b.pubs[r.ID], m.Payload)
				b.pubMu.Unlock()
			}
		}
	})
	for _, j := range js {
		e, err := c.prod.Enqueue(ctx, j, w.Channel())
		if err != nil {
			t.Fatalf("enqueue %s: %v", j.ID, err)
		}
		w.Add(e)
		b.byID[j.ID] = j
	}
	wg.Go(func() {
		defer w.Close()
		for w.Pending() > 0 {
			r, err := w.Next(ctx)
			if err != nil {
				if ctx.Err() == nil {
					b.errc <- err
				}
				return
			}
			b.results <- r
		}
	})
	go func() {
		wg.Wait()
		close(b.done)
	}()
	t.Cleanup(func() {
		cancel()
		ps.Close()
		<-b.done
	})
	return b
}

// merge returns the jobs and results of collected batches as one, for
// the checks.
func merge(bs ...*batch) *batch {
	m := &batch{byID: map[string]jobs.Job{}, got: map[string]jobs.Result{}, arrived: map[string]time.Time{}, pubs: map[string][]string{}}
	for _, b := range bs {
		m.jobs = append(m.jobs, b.jobs...)
		maps.Copy(m.byID, b.byID)
		maps.Copy(m.got, b.got)
		maps.Copy(m.arrived, b.arrived)
		b.pubMu.Lock()
		maps.Copy(m.pubs, b.pubs)
		b.pubMu.Unlock()
	}
	return m
}

// pending returns how many jobs have no result yet.
func (b *batch) pending() int { return len(b.jobs) - len(b.got) }

// collect receives results until every job has one; it fails the test
// after limit. If tick is not nil, collect calls it after each result that
// leaves jobs pending, and every 100 ms meanwhile: the tests inject their
// faults from it, when faultDue says so.
func (b *batch) collect(t *testing.T, limit time.Duration, tick func()) {
	t.Helper()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	ticker := time.NewTicker(100 * time.Millisecond)
	defer ticker.Stop()
	for b.pending() > 0 {
		select {
		case r := <-b.results:
			if _, dup := b.got[r.ID]; dup {
				t.Errorf("job %s: the producer got a second result", r.ID)
			}
			b.got[r.ID] = r
			b.arrived[r.ID] = time.Now()
			if tick != nil && b.pending() > 0 {
				tick()
			}
		case err := <-b.errc:
			t.Fatalf("waiting for results (%d of %d in): %v", len(b.got), len(b.jobs), err)
		case <-ticker.C:
			if tick != nil {
				tick()
			}
		case <-deadline.C:
			var missing []string
			for _, j := range b.jobs {
				if _, ok := b.got[j.ID]; !ok {
					missing = append(missing, j.ID)
				}
			}
			t.Fatalf("after %v, %d of %d jobs have no result: %v", limit, len(missing), len(b.jobs), missing[:min(len(missing), 20)])
		}
	}
}

// faultDue reports whether the next of a test's k faults is due, done of
// them having been injected. Fault i (from 0) falls once (i+1)/(k+1) of the
// batch's results are in, or, when every > 0, once (i+1)·every has passed
// since the batch began, whichever comes first; and not sooner than gap
// after the one before (last). Progress alone let results that came in a
// burst at the end (a loaded machine) hold the faults until the commands
// were done; the clock alone let a quick batch end before the first fault.
func (b *batch) faultDue(done, k int, last time.Time, gap, every time.Duration) bool {
	if done >= k || time.Since(last) < gap {
		return false
	}
	return len(b.got) >= (done+1)*len(b.jobs)/(k+1) ||
		every > 0 && time.Since(b.started) >= time.Duration(done+1)*every
}

// checkOneAnswer checks that every job has exactly one answer: the
// producer's result, every notification published for it and the result
// stored in Redis are the same result of the same job.
func (b *batch) checkOneAnswer(t *testing.T, rdb redis.UniversalClient) {
	t.Helper()
	ctx := context.Background()
	b.pubMu.Lock()
	defer b.pubMu.Unlock()
	for _, j := range b.jobs {
		r, ok := b.got[j.ID]
		if !ok {
			t.Errorf("job %s: no result", j.ID)
			continue
		}
		if r.ID != j.ID || r.TaskID != j.TaskID || r.ExecID != jobs.ExecID(j.ID) {
			t.Errorf("job %s: result names job %q task %q exec %q", j.ID, r.ID, r.TaskID, r.ExecID)
		}
		stored, err := rdb.HGet(ctx, "asynq:{"+jobs.DefaultQueue+"}:t:"+j.ID, "result").Result()
		if err != nil {
			t.Errorf("job %s: stored result: %v", j.ID, err)
			continue
		}
		var sr jobs.Result
		if err := json.Unmarshal([]byte(stored), &sr); err != nil || !sameResult(sr, r) {
			t.Errorf("job %s: stored result differs from the one the producer got:\nstored %s\ngot    %+v", j.ID, stored, r)
		}
		for _, p := range b.pubs[j.ID] {
			if p != stored {
				t.Errorf("job %s: two different results were published:\n%s\n%s", j.ID, p, stored)
			}
		}
	}
}

// sameResult compares two results (times compared as instants).
func sameResult(a, b jobs.Result) bool {
	ab, _ := json.Marshal(a)
	bb, _ := json.Marshal(b)
	return string(ab) == string(bb)
}

// checkCompleted checks that every job completed with the output its
// command prints.
func (b *batch) checkCompleted(t *testing.T) {
	t.Helper()
	bad := 0
	for _, j := range b.jobs {
		r := b.got[j.ID]
		if r.Status != jobs.StatusCompleted || r.ReturnCode != 0 || r.Output != wantOutput(j.ID) {
			bad++
			if bad <= 10 {
				t.Errorf("job %s: %s/%d output %q error %q, want completed/0 %q", j.ID, r.Status, r.ReturnCode, r.Output, r.Error, wantOutput(j.ID))
			}
		}
	}
	if bad > 10 {
		t.Errorf("... %d jobs in all without the right result", bad)
	}
}

// runCounts reads, from the gateway's state dir, how many times each job's
// command ran: the "ran <id> <unix time>" lines of every task's runs.log,
// as kept in the snapshots of reaped sandboxes (call it once no sandbox is
// live, or a live one's copy would count twice). It also returns the
// overlaps seen.
func runCounts(t *testing.T, stateDir string) (ran map[string]int, overlaps []string) {
	t.Helper()
	ran = map[string]int{}
	for id, ts := range runTimes(t, stateDir) {
		ran[id] = len(ts)
	}
	ofiles, _ := filepath.Glob(filepath.Join(stateDir, "snapshots", "*", "root", "overlap.log"))
	for _, f := range ofiles {
		b, _ := os.ReadFile(f)
		overlaps = append(overlaps, scanLines(b)...)
	}
	return ran, overlaps
}

// runTimes reads when each job's command started, every time it ran (see
// runCounts).
func runTimes(t *testing.T, stateDir string) map[string][]time.Time {
	t.Helper()
	runs := map[string][]time.Time{}
	files, err := filepath.Glob(filepath.Join(stateDir, "snapshots", "*", "root", "runs.log"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range scanLines(b) {
			var id string
			var at float64
			if _, err := fmt.Sscanf(l, "ran %s %f", &id, &at); err == nil {
				runs[id] = append(runs[id], time.Unix(0, int64(at*1e9)))
			}
		}
	}
	return runs
}

// checkRanOnce checks that every job's command ran exactly once, and that
// no two commands of a task overlapped.
func (b *batch) checkRanOnce(t *testing.T, stateDir string) (ranTotal int) {
	t.Helper()
	ran, overlaps := runCounts(t, stateDir)
	bad := 0
	for _, j := range b.jobs {
		ranTotal += ran[j.ID]
		if n := ran[j.ID]; n != 1 {
			bad++
			if bad <= 10 {
				r := b.got[j.ID]
				t.Errorf("job %s: its command ran %d times, want once (result %s, attempts %d, sandbox %s, recreated %v)",
					j.ID, n, r.Status, r.Attempts, r.SandboxID, r.SandboxRecreated)
			}
		}
	}
	if bad > 10 {
		t.Errorf("... %d jobs in all did not run exactly once", bad)
	}
	if len(overlaps) > 0 {
		t.Errorf("commands of one task overlapped: %v", overlaps[:min(len(overlaps), 10)])
	}
	return ranTotal
}

// checkNoLeak waits until the gateway has no live sandbox and the pool no
// record (the idle TTL passed and the reaper ran), for at most d.
func (c *cluster) checkNoLeak(t *testing.T, d time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	ctx := context.Background()
	var live []gateway.SandboxInfo
	var records int64
	deadline := time.Now().Add(d)
	for {
		var err error
		live, err = c.gw.live(ctx)
		if err != nil {
			t.Fatalf("list sandboxes: %v", err)
		}
		records, err = c.rdb.ZCard(ctx, "boxq:sandboxes").Result()
		if err != nil {
			t.Fatalf("count pool records: %v", err)
		}
		if len(live) == 0 && records == 0 {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Errorf("%v after the batch, %d sandboxes are live at the gateway and the pool has %d records; want none (idle TTL %v)",
		d, len(live), records, cmp.Or(c.wo.idleTTL, 3*time.Second))
	for _, sb := range live[:min(len(live), 10)] {
		t.Logf("live: %+v", sb)
	}
	return time.Since(start)
}

// summary describes a set of durations: count, min, median, p90, p99, max.
func summary(ds []time.Duration) string {
	if len(ds) == 0 {
		return "none"
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	q := func(p float64) time.Duration { return s[int(p*float64(len(s)-1))].Round(100 * time.Millisecond) }
	return fmt.Sprintf("n=%d min %v median %v p90 %v p99 %v max %v", len(s), q(0), q(0.5), q(0.9), q(0.99), q(1))
}

// latencies summarises the jobs' times from enqueue to result.
func (b *batch) latencies() string {
	var ds []time.Duration
	for id, r := range b.got {
		if !r.QueuedAt.IsZero() {
			ds = append(ds, b.arrived[id].Sub(r.QueuedAt))
		}
	}
	return summary(ds)
}

// pickWorker returns a random running worker.
func pickWorker(rng *rand.Rand, ws []*proc) *proc {
	if len(ws) == 0 {
		return nil
	}
	return ws[rng.IntN(len(ws))]
}

// signalWorker sends sig to a worker and notes when.
func signalWorker(p *proc, sig syscall.Signal) time.Time {
	at := time.Now()
	p.signal(sig)
	return at
}

// killWorker SIGKILLs a worker process, waits for it to be gone, and
// returns when the signal was sent.
func killWorker(p *proc) time.Time {
	at := signalWorker(p, syscall.SIGKILL)
	<-p.done
	return at
}

func ptr[T any](v T) *T { return &v }
