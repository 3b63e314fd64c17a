package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/boxq/boxq/jobs"
)

// workerCheckAfter is how long a wait goes before enqueue checks that a
// live worker serves the queues of the jobs it waits for (and warns when
// none does); workerCheckEvery how often it checks again.
const (
	workerCheckAfter = 5 * time.Second
	workerCheckEvery = 30 * time.Second
)

// collector waits for the results of a Waiter's jobs, and meanwhile keeps
// the user told: it redraws the progress every second with what the jobs
// wait for, warns when no worker serves their queue, and, for one job,
// says what it waits for when that changes.
type collector struct {
	prod   *jobs.Producer
	w      *jobs.Waiter
	stderr io.Writer
	prog   *progress // nil for one job
	// one is the job of a single-job wait ("" for a batch).
	one       string
	start     time.Time
	nextCheck time.Time
	warned    map[string]bool
	lastState string
}

func newCollector(prod *jobs.Producer, w *jobs.Waiter, stderr io.Writer, prog *progress, one string) *collector {
	now := time.Now()
	return &collector{prod: prod, w: w, stderr: stderr, prog: prog, one: one, start: now,
		nextCheck: now.Add(workerCheckAfter), warned: map[string]bool{}}
}

// say prints a line on stderr without gluing it to the progress bar.
func (c *collector) say(format string, args ...any) {
	if c.prog != nil {
		c.prog.clear()
	}
	fmt.Fprintf(c.stderr, format+"\n", args...)
	if c.prog != nil {
		c.prog.draw()
	}
}

// next waits for the next result.
func (c *collector) next(ctx context.Context) (jobs.Result, error) {
	for {
		tctx, cancel := context.WithTimeout(ctx, time.Second)
		res, err := c.w.Next(tctx)
		cancel()
		if err == nil || ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
			return res, err
		}
		c.tick(ctx)
	}
}

// tick runs once a second while no result comes.
func (c *collector) tick(ctx context.Context) {
	if c.prog != nil {
		c.prog.setWaits(c.w.Counts())
		c.prog.draw()
	}
	now := time.Now()
	if now.Before(c.nextCheck) {
		return
	}
	c.nextCheck = now.Add(workerCheckEvery)
	if c.one != "" {
		c.nextCheck = now.Add(workerCheckAfter)
		c.tellState(ctx)
	}
	c.checkWorkers(c.w.Queues())
}

// tellState says what the one job waits for, when that changed.
func (c *collector) tellState(ctx context.Context) {
	st, err := c.prod.Status(ctx, c.one)
	if err != nil || st.State == jobs.StateDone || st.State == jobs.StateRunning {
		return
	}
	if s := st.String(); s != c.lastState {
		c.lastState = s
		c.say("enqueue: job %s: %s", c.one, s)
	}
}

// checkWorkers warns, once per queue, when no live worker serves a queue
// that jobs wait in. The wait goes on: a worker may be started later.
func (c *collector) checkWorkers(queues []string) {
	served, err := c.prod.QueuesServed()
	if err != nil {
		return // the wait itself says when Redis fails
	}
	for _, q := range queues {
		if served[q] > 0 || c.warned[q] {
			continue
		}
		c.warned[q] = true
		others := "no worker is running"
		if len(served) > 0 {
			others = "live workers serve " + strings.Join(slices.Sorted(maps.Keys(served)), ", ")
		}
		hint := fmt.Sprintf("worker -queues '%s=1'", q)
		if q == jobs.DefaultQueue {
			hint = "worker"
		}
		c.say("enqueue: no live worker serves queue %q (%s); still waiting: start one (%s)", q, others, hint)
	}
}

// interrupted explains a wait that ended before every result came, naming
// the jobs that have none yet: on stderr when they are few, else in a
// file named in the message.
func (c *collector) interrupted(cause error) error {
	if c.prog != nil {
		c.prog.finish()
	}
	ids := c.w.Outstanding()
	if len(ids) == 0 {
		return cause
	}
	what := fmt.Sprintf("%d jobs have no result yet", len(ids))
	if len(ids) == 1 {
		what = "job " + ids[0] + " has no result yet"
	}
	const inline = 20
	switch {
	case len(ids) == 1:
	case len(ids) <= inline:
		fmt.Fprintf(c.stderr, "enqueue: the jobs without a result:\n%s\n", strings.Join(ids, "\n"))
	default:
		f, err := os.CreateTemp("", "enqueue-outstanding-*.txt")
		if err == nil {
			_, err = f.WriteString(strings.Join(ids, "\n") + "\n")
			err = errors.Join(err, f.Close())
		}
		if err != nil {
			fmt.Fprintf(c.stderr, "enqueue: the jobs without a result:\n%s\n", strings.Join(ids, "\n"))
		} else {
			what += " (their ids are in " + f.Name() + ")"
		}
	}
	return fmt.Errorf("%s: %w; the jobs go on: read a result later with enqueue -result ID [-wait]", what, cause)
}
