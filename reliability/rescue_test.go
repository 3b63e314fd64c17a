package reliability

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/boxq/boxq/jobs"
)

// rescueJob is a job whose command notes each run in a file on the host
// (the cluster's gateway runs without isolation), then sleeps.
func rescueJob(t *testing.T, id string, sleep float64) (jobs.Job, string) {
	runs := filepath.Join(t.TempDir(), id+".runs")
	return jobs.Job{ID: id, TaskID: "task-" + id, TimeoutS: ptr(120.0),
		Command: fmt.Sprintf("echo ran >> %s; sleep %g; echo done %s", runs, sleep, id)}, runs
}

// runsOf counts the runs a rescueJob noted.
func runsOf(path string) int {
	b, _ := os.ReadFile(path)
	return strings.Count(string(b), "ran\n")
}

func waitRunning(t *testing.T, runs string) {
	t.Helper()
	waitFor(t, 30*time.Second, "the command to start", func() bool { return runsOf(runs) > 0 })
}

// TestSIGKILLedWorkerAnswersInSeconds: a worker SIGKILLed mid-command;
// another worker's rescuer finishes the job within seconds (asynq alone
// takes one to two minutes), with the command's own output, run once.
func TestSIGKILLedWorkerAnswersInSeconds(t *testing.T) {
	t.Parallel()
	c := newCluster(t, clusterOptions{})
	a := c.startWorker(t)
	j, runs := rescueJob(t, "sigkill", 3)
	b := c.enqueue(t, []jobs.Job{j})
	waitRunning(t, runs)
	killed := killWorker(a)
	c.startWorker(t)
	b.collect(t, 2*time.Minute, nil)
	r := b.got[j.ID]
	took := b.arrived[j.ID].Sub(killed)
	t.Logf("SIGKILL to result: %v (result %+v)", took.Round(100*time.Millisecond), r)
	if r.Status != jobs.StatusCompleted || r.Output != "done sigkill\n" || !r.Rescued {
		t.Errorf("result %+v, want completed by a rescuer with the command's output", r)
	}
	if took > 30*time.Second {
		t.Errorf("the result came %v after the kill: not rescued, waited for asynq", took)
	}
	if n := runsOf(runs); n != 1 {
		t.Errorf("the command ran %d times, want once", n)
	}
	b.checkOneAnswer(t, c.rdb)
}

// TestPausedWorkerLosesItsJobOnce: a worker paused (SIGSTOP) past its
// lease while its command runs; a rescuer takes the job over and writes
// the result. The worker, resumed (SIGCONT), finds its lease lost, stops
// waiting, and writes nothing: exactly one result, the command run once.
func TestPausedWorkerLosesItsJobOnce(t *testing.T) {
	t.Parallel()
	c := newCluster(t, clusterOptions{})
	a := c.startWorker(t)
	j, runs := rescueJob(t, "paused", 4)
	b := c.enqueue(t, []jobs.Job{j})
	waitRunning(t, runs)
	a.signal(syscall.SIGSTOP)
	c.startWorker(t)
	b.collect(t, 2*time.Minute, nil)
	a.signal(syscall.SIGCONT)
	r := b.got[j.ID]
	if r.Status != jobs.StatusCompleted || r.Output != "done paused\n" || !r.Rescued {
		t.Errorf("result %+v, want completed by the rescuer", r)
	}
	// The resumed worker notices, and leaves the job to the rescuer: it
	// hears of the loss from its lease's renewal while it waits for the
	// command, or from the fenced result write if the command's end comes
	// first.
	waitFor(t, 30*time.Second, "the resumed worker to notice it lost the job", func() bool {
		for _, l := range a.logs.Lines() {
			if strings.Contains(l, "lease lost to another holder") || strings.Contains(l, "another holder took the job over") {
				return true
			}
		}
		return false
	})
	// Its job comes back (the resumed worker put it back) and finds the
	// result: once asynq has it done, nothing writes for it any more.
	insp := asynq.NewInspectorFromRedisClient(c.rdb)
	waitFor(t, 2*time.Minute, "the job to be done in asynq", func() bool {
		info, err := insp.GetTaskInfo(jobs.DefaultQueue, j.ID)
		return err == nil && info.State == asynq.TaskStateCompleted
	})
	b.checkOneAnswer(t, c.rdb)
	b.pubMu.Lock()
	pubs := len(b.pubs[j.ID])
	b.pubMu.Unlock()
	if pubs != 1 {
		t.Errorf("the result was published %d times, want once", pubs)
	}
	if n := runsOf(runs); n != 1 {
		t.Errorf("the command ran %d times, want once", n)
	}
}

// TestRescuerKilledMidRescue: the worker running a command dies, and so
// does the worker whose rescuer took the command over; a third one
// finishes the job.
func TestRescuerKilledMidRescue(t *testing.T) {
	t.Parallel()
	c := newCluster(t, clusterOptions{})
	a := c.startWorker(t)
	j, runs := rescueJob(t, "rescuer", 14)
	b := c.enqueue(t, []jobs.Job{j})
	waitRunning(t, runs)
	killWorker(a)
	rescuer := c.startWorker(t)
	if err := rescuer.waitLog(60*time.Second, "rescuing a dead worker's command", j.ID); err != nil {
		t.Fatal(err)
	}
	killWorker(rescuer)
	third := c.startWorker(t)
	b.collect(t, 2*time.Minute, nil)
	r := b.got[j.ID]
	if r.Status != jobs.StatusCompleted || r.Output != "done rescuer\n" || !r.Rescued {
		t.Errorf("result %+v, want completed by the second rescuer", r)
	}
	if err := third.waitLog(time.Second, "rescued a dead worker's command", j.ID); err != nil {
		t.Error(err)
	}
	if n := runsOf(runs); n != 1 {
		t.Errorf("the command ran %d times, want once", n)
	}
	b.checkOneAnswer(t, c.rdb)
}

// TestGatewayRestartWhileOrphaned: the worker running a command dies, and
// the gateway restarts before a rescuer gets there: the command is gone
// with its sandbox. The result is a clear error, and nothing runs again.
func TestGatewayRestartWhileOrphaned(t *testing.T) {
	t.Parallel()
	c := newCluster(t, clusterOptions{})
	a := c.startWorker(t)
	j, runs := rescueJob(t, "orphan", 30)
	b := c.enqueue(t, []jobs.Job{j})
	waitRunning(t, runs)
	killWorker(a)
	c.gw.kill()
	c.gw.start(t, nil)
	c.startWorker(t)
	b.collect(t, 3*time.Minute, nil)
	r := b.got[j.ID]
	t.Logf("result: %+v", r)
	if r.Status != jobs.StatusError || !strings.Contains(r.Error, "not run again") {
		t.Errorf("result %+v, want status error saying the command is not run again", r)
	}
	// The job's own re-delivery by asynq (a minute or two later) must not
	// run it either; the result is what it finds.
	if n := runsOf(runs); n != 1 {
		t.Errorf("the command ran %d times, want once", n)
	}
	b.checkOneAnswer(t, c.rdb)
}
