package reliability

import (
	"encoding/json"
	"math/rand/v2"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"
)

// TestWorkerSIGKILL kills worker processes outright in the middle of a
// batch, each time starting a replacement, and checks that every job still
// gets exactly one result, that every command ran exactly once, and that no
// sandbox outlives the idle TTL.
//
// A SIGKILLed worker's commands are finished by a rescuer in another
// worker: the pool's lease (5 s TTL, renewed every 1.5 s) lapses, the
// rescuer claims the task, re-attaches to the exec and writes the result
// (docs/LIFECYCLE.md). Jobs that had not started a command wait for asynq's
// own recovery (its 30 s lease, its once-a-minute recoverer); their
// re-delivery runs them.
func TestWorkerSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for asynq's crash recovery (1-2 minutes)")
	}
	t.Parallel()
	c := newCluster(t, clusterOptions{})
	for range 3 {
		c.startWorker(t)
	}
	var (
		n, tasks = pick(90, 300), pick(15, 30)
		kills    = pick(2, 12)
		gap      = pick(2500*time.Millisecond, 2500*time.Millisecond)
		every    = pick(4*time.Second, 6*time.Second)
		seed     = uint64(time.Now().UnixNano())
		rng      = rand.New(rand.NewPCG(seed, 1))
		insp     = asynq.NewInspectorFromRedisClient(c.rdb)
	)
	t.Logf("%d jobs over %d tasks, 3 workers, %d SIGKILLs spread over the batch, at least %v apart, seed %d", n, tasks, kills, gap, seed)
	b := c.enqueue(t, makeBatch("kill", n, tasks, pick("2", "4")))
	var killedAt []time.Time
	killedWith := map[string]time.Time{} // job → when the worker running it was killed
	var last time.Time
	b.collect(t, pick(4*time.Minute, 12*time.Minute), func() {
		if !b.faultDue(len(killedAt), kills, last, gap, every) {
			return
		}
		// A victim that has been up for a heartbeat or two (asynq beats
		// every 5 s), so that Redis knows which jobs it runs.
		var ripe []*proc
		for _, w := range c.running() {
			if time.Since(w.started) > 6*time.Second {
				ripe = append(ripe, w)
			}
		}
		victim := pickWorker(rng, ripe)
		if victim == nil {
			return
		}
		active := activeJobs(insp, victim.cmd.Process.Pid)
		at := killWorker(victim)
		killedAt = append(killedAt, at)
		last = at
		for _, id := range active {
			killedWith[id] = at
		}
		c.startWorker(t)
	})
	batchTime := time.Since(b.started)
	b.checkOneAnswer(t, c.rdb)
	b.checkCompleted(t)
	reap := c.checkNoLeak(t, 90*time.Second)
	ran := b.checkRanOnce(t, c.gw.stateDir)

	// How long the jobs of killed workers took to come back: those whose
	// command had started (runs.log says when) on a killed worker (its last
	// heartbeat, at most 5 s old, listed them).
	var redelivered, inFlight, notStarted []time.Duration
	retried, rescued := 0, 0
	starts := runTimes(t, c.gw.stateDir)
	for _, j := range b.jobs {
		r := b.got[j.ID]
		if r.Rescued {
			rescued++
		}
		if r.Attempts < 2 && !r.Rescued {
			continue
		}
		retried++
		at, ok := killedWith[j.ID]
		if !ok && r.Rescued {
			// Started after the victim's last heartbeat: a rescued job was
			// orphaned by the first kill after it started.
			i, _ := slices.BinarySearchFunc(killedAt, r.StartedAt, func(k, s time.Time) int { return k.Compare(s) })
			at, ok = time.Time{}, i < len(killedAt)
			if ok {
				at = killedAt[i]
			}
		}
		if !ok {
			continue // not known to be the victim's
		}
		if ts := starts[j.ID]; len(ts) == 0 || ts[0].After(at) {
			notStarted = append(notStarted, b.arrived[j.ID].Sub(at))
			continue
		}
		if !r.Rescued {
			redelivered = append(redelivered, r.StartedAt.Sub(at))
		}
		inFlight = append(inFlight, b.arrived[j.ID].Sub(at))
	}
	t.Logf("batch: %d jobs, %d results in %v; %d SIGKILLs; %d jobs re-delivered or rescued, %d rescued; %d command runs for %d jobs; no sandbox live %v after the last result",
		n, len(b.got), batchTime.Round(time.Second), len(killedAt), retried, rescued, ran, n, reap.Round(100*time.Millisecond))
	t.Logf("commands in flight on a killed worker, SIGKILL to result: %s", summary(inFlight))
	t.Logf("commands in flight on a killed worker and re-delivered by asynq rather than rescued, SIGKILL to the next delivery: %s", summary(redelivered))
	t.Logf("jobs on a killed worker whose command had not started, SIGKILL to result: %s", summary(notStarted))
	// The goal is p50 <= 8 s and p99 <= 15 s (docs/RELIABILITY.md has the
	// figures); the bound here only tells the rescuer from asynq's own
	// recovery (30 s lease + a once-a-minute recoverer), with room for a
	// loaded machine.
	for _, d := range inFlight {
		if d > 30*time.Second {
			t.Errorf("a command in flight on a killed worker answered %v after the kill: the rescuer did not take it over", d.Round(time.Second))
			break
		}
	}
	t.Logf("all jobs, enqueue to result: %s", b.latencies())
	if len(killedAt) < kills {
		t.Errorf("the batch ended after %d of %d kills: make it longer", len(killedAt), kills)
	}
	if retried == 0 {
		t.Errorf("no job was re-delivered: the kills hit no job in flight, so the test proved nothing")
	}
}

// busiestWorker returns the worker running the most jobs, as their last
// heartbeats told Redis (a random one among equals): stopping it leaves
// the most commands to re-attach to, so that the test does not depend on
// where the jobs happened to be.
func busiestWorker(rng *rand.Rand, insp *asynq.Inspector, ws []*proc) *proc {
	var best []*proc
	most := -1
	for _, w := range ws {
		switch n := len(activeJobs(insp, w.cmd.Process.Pid)); {
		case n > most:
			best, most = []*proc{w}, n
		case n == most:
			best = append(best, w)
		}
	}
	return pickWorker(rng, best)
}

// activeJobs returns the jobs the worker process pid is running, as its
// last heartbeat told Redis.
func activeJobs(insp *asynq.Inspector, pid int) []string {
	servers, err := insp.Servers()
	if err != nil {
		return nil
	}
	var ids []string
	for _, s := range servers {
		if s.PID != pid {
			continue
		}
		for _, w := range s.ActiveWorkers {
			ids = append(ids, w.TaskID)
		}
	}
	return ids
}

// TestWorkerSIGTERM stops worker processes with SIGTERM in the middle of a
// batch whose commands outlast the shutdown timeout, each time starting a
// replacement. A stopping worker lets running jobs finish for
// -shutdown-timeout, then puts the rest back in the queue and leaves their
// commands running; the next worker re-attaches to them.
func TestWorkerSIGTERM(t *testing.T) {
	t.Parallel()
	const shutdownTimeout = time.Second
	c := newCluster(t, clusterOptions{workers: workerOptions{shutdownTimeout: shutdownTimeout}})
	for range 3 {
		c.startWorker(t)
	}
	var (
		n, tasks = pick(60, 300), pick(12, 30)
		stops    = pick(3, 20)
		gap      = pick(time.Second, 3*time.Second)
		every    = pick(2500*time.Millisecond, 3*time.Second)
		seed     = uint64(time.Now().UnixNano())
		rng      = rand.New(rand.NewPCG(seed, 2))
		insp     = asynq.NewInspectorFromRedisClient(c.rdb)
	)
	t.Logf("%d jobs over %d tasks, 3 workers, %d SIGTERMs spread over the batch, shutdown timeout %v, seed %d",
		n, tasks, stops, shutdownTimeout, seed)
	b := c.enqueue(t, makeBatch("term", n, tasks, "2"))
	var stoppedAt []time.Time
	var exitTimes []time.Duration
	var last time.Time
	b.collect(t, pick(3*time.Minute, 10*time.Minute), func() {
		if !b.faultDue(len(stoppedAt), stops, last, gap, every) {
			return
		}
		victim := busiestWorker(rng, insp, c.running())
		at := signalWorker(victim, syscall.SIGTERM)
		stoppedAt = append(stoppedAt, at)
		c.startWorker(t)
		if err := victim.waitExit(shutdownTimeout + 20*time.Second); err != nil {
			t.Errorf("%s after SIGTERM: %v", victim.name, err)
		}
		exitTimes = append(exitTimes, time.Since(at))
		last = time.Now()
	})
	batchTime := time.Since(b.started)
	b.checkOneAnswer(t, c.rdb)
	b.checkCompleted(t)
	reap := c.checkNoLeak(t, 90*time.Second)
	ran := b.checkRanOnce(t, c.gw.stateDir)

	// The jobs whose command a stopping worker left running: their result
	// came from the worker that re-attached.
	detached := map[string]bool{}
	for _, l := range c.allLogs() {
		var e struct {
			Msg   string `json:"msg"`
			JobID string `json:"job_id"`
		}
		if json.Unmarshal([]byte(l), &e) == nil && e.Msg == "worker stopping; leaving the exec running for the next delivery" {
			detached[e.JobID] = true
		}
	}
	var reattach []time.Duration
	for id := range detached {
		r := b.got[id]
		i, _ := slices.BinarySearchFunc(stoppedAt, r.StartedAt, func(k, s time.Time) int { return k.Compare(s) })
		if i > 0 {
			reattach = append(reattach, b.arrived[id].Sub(stoppedAt[i-1]))
		}
	}
	t.Logf("batch: %d jobs, %d results in %v; %d SIGTERMs, workers exited in %s; %d commands left running and re-attached; %d command runs for %d jobs; no sandbox live %v after the last result",
		n, len(b.got), batchTime.Round(time.Second), len(stoppedAt), summary(exitTimes), len(detached), ran, n, reap.Round(100*time.Millisecond))
	t.Logf("re-attached jobs, SIGTERM to result: %s", summary(reattach))
	t.Logf("all jobs, enqueue to result: %s", b.latencies())
	if len(detached) == 0 {
		t.Errorf("no stopping worker left a command running: the test proved nothing")
	}
}
