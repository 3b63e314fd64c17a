package reliability

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
)

// TestRedisRestart kills Redis (SIGKILL; it runs with appendonly and
// appendfsync always, so what it acknowledged is on disk) in the middle of
// a batch and starts it again on the same port. Worker processes, the
// test's producer and an `enqueue -f -wait` process waiting for a batch of
// its own must all ride it out: every job gets exactly one result, every
// command runs once, nothing is lost.
func TestRedisRestart(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t, "--appendonly", "yes", "--appendfsync", "always")
	c := newCluster(t, clusterOptions{redis: srv})
	for range 3 {
		c.startWorker(t)
	}
	var (
		n, tasks = pick(60, 300), pick(12, 30)
		restarts = pick(1, 3)
		gap      = pick(time.Second, 3*time.Second)
		down     = []time.Duration{time.Second, 3 * time.Second, 5 * time.Second}
	)

	// A batch of the enqueue program, waiting for its results.
	dir := t.TempDir()
	cliJobs := makeBatch("rcli", n/2, tasks/2, "1")
	var in bytes.Buffer
	for _, j := range cliJobs {
		line, _ := json.Marshal(j)
		in.Write(append(line, '\n'))
	}
	batchFile, outFile := filepath.Join(dir, "batch.jsonl"), filepath.Join(dir, "results.jsonl")
	if err := os.WriteFile(batchFile, in.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	cli := startProc(t, "enqueue", binary(t, "enqueue"),
		[]string{"-redis", c.redisURL, "-f", batchFile, "-wait", "-o", outFile}, cleanEnv())

	t.Logf("%d jobs over %d tasks, and %d more from enqueue -wait; 3 workers; %d Redis kills spread over the batch", n, tasks, len(cliJobs), restarts)
	b := c.enqueue(t, makeBatch("redis", n, tasks, "1"))
	var killedAt []time.Time
	var last time.Time
	b.collect(t, pick(3*time.Minute, 10*time.Minute), func() {
		if !b.faultDue(len(killedAt), restarts, last, gap, 0) {
			return
		}
		killedAt = append(killedAt, time.Now())
		if err := srv.Kill(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(down[(len(killedAt)-1)%len(down)])
		if err := srv.Restart(); err != nil {
			t.Fatal(err)
		}
		last = time.Now()
	})
	batchTime := time.Since(b.started)
	if len(killedAt) < restarts {
		t.Errorf("the batch ended after %d of %d Redis kills: make it longer", len(killedAt), restarts)
	}
	b.checkOneAnswer(t, c.rdb)
	b.checkCompleted(t)

	if err := cli.waitExit(2 * time.Minute); err != nil {
		t.Errorf("enqueue -f -wait: %v\n%s", err, cli.logs.String())
	}
	out, err := os.ReadFile(outFile)
	if err != nil {
		t.Fatal(err)
	}
	cliGot := map[string]jobs.Result{}
	for _, l := range scanLines(out) {
		var r jobs.Result
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Errorf("enqueue result line %q: %v", l, err)
			continue
		}
		if _, dup := cliGot[r.ID]; dup {
			t.Errorf("enqueue printed two results for job %s", r.ID)
		}
		cliGot[r.ID] = r
	}
	for _, j := range cliJobs {
		r, ok := cliGot[j.ID]
		if !ok || r.Status != jobs.StatusCompleted || r.Output != wantOutput(j.ID) {
			t.Errorf("enqueue result of %s: %+v (present %v)", j.ID, r, ok)
		}
	}

	c.checkNoLeak(t, 90*time.Second)
	ran := b.checkRanOnce(t, c.gw.stateDir)
	cliRuns, _ := runCounts(t, c.gw.stateDir)
	for _, j := range cliJobs {
		if k := cliRuns[j.ID]; k != 1 {
			t.Errorf("job %s (enqueue's batch): its command ran %d times, want once", j.ID, k)
		}
	}
	retried := 0
	for _, r := range b.got {
		if r.Attempts > 1 {
			retried++
		}
	}
	t.Logf("batch: %d jobs, %d results in %v (%d needed more than one attempt), enqueue's %d jobs: %d results; %d Redis kills; %d command runs for %d jobs",
		n, len(b.got), batchTime.Round(100*time.Millisecond), retried, len(cliJobs), len(cliGot), len(killedAt), ran, n)
	t.Logf("all jobs, enqueue to result: %s", b.latencies())
}

// TestRedisOutageLongerThanLease keeps Redis down for longer than asynq's
// 30 s lease while a command runs. The worker cannot renew the lease, so
// asynq stops waiting for the job (and later delivers it again): the
// command must not be killed for it, and the job must end with the
// command's own result, run once.
func TestRedisOutageLongerThanLease(t *testing.T) {
	if testing.Short() {
		t.Skip("keeps Redis down for 40 s and waits for asynq's recovery")
	}
	t.Parallel()
	srv := redistest.StartServer(t, "--appendonly", "yes", "--appendfsync", "always")
	c := newCluster(t, clusterOptions{redis: srv})
	c.startWorker(t)
	j := makeBatch("outage", 1, 1, "45")[0]
	b := c.enqueue(t, []jobs.Job{j})
	waitFor(t, 30*time.Second, "the command to start", func() bool {
		live, err := c.gw.live(context.Background())
		return err == nil && len(live) == 1 && live[0].RunningExecs == 1
	})
	if err := srv.Kill(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(40 * time.Second)
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	b.collect(t, 4*time.Minute, nil)
	b.checkOneAnswer(t, c.rdb)
	b.checkCompleted(t)
	c.checkNoLeak(t, 60*time.Second)
	b.checkRanOnce(t, c.gw.stateDir)
	r := b.got[j.ID]
	t.Logf("result after %v: %s/%d, attempts %d", r.FinishedAt.Sub(r.QueuedAt).Round(time.Second), r.Status, r.ReturnCode, r.Attempts)
}
