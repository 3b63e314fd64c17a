package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/jobs"
)

// runFanOut runs one command in every task of -tasks or -tasks-file (or
// terminates them, with -terminate).
func runFanOut(ctx context.Context, o *options, x *schedOptions, prod *jobs.Producer, runAt *time.Time, stdin io.Reader, stdout, stderr io.Writer) error {
	var (
		tasks []string
		err   error
		what  string
	)
	if x.tasks != "" {
		what = "matches " + shellQuote(x.tasks)
		if tasks, err = prod.MatchTasks(ctx, x.tasks); err != nil {
			return app.Usagef("-tasks: %v", err)
		}
	} else {
		what = "is listed in " + x.tasksFile
		if tasks, err = readTasksFile(x.tasksFile); err != nil {
			return err
		}
	}
	if len(tasks) == 0 {
		fmt.Fprintf(stderr, "enqueue: no task %s (a task is listed once it has a sandbox)\n", what)
		return &app.ExitError{Code: 1}
	}
	if o.terminate {
		return terminateMany(ctx, o, prod, tasks, stdout, stderr)
	}
	tmpl, err := template(o, stdin)
	if err != nil {
		return err
	}
	tmpl.RunAt = runAt
	js := make([]jobs.Job, len(tasks))
	for i, task := range tasks {
		j := tmpl
		j.TaskID = task
		if err := j.Validate(); err != nil {
			return app.Usagef("task %q: %v", task, err)
		}
		js[i] = j
	}
	if !o.wait {
		for _, j := range js {
			e, err := prod.Enqueue(ctx, j, "")
			if err != nil {
				return err
			}
			fmt.Fprintln(stdout, e.ID)
		}
		fmt.Fprintf(stderr, "enqueued %d jobs, one per task that %s\n", len(js), what)
		return nil
	}
	w, err := prod.Subscribe(ctx)
	if err != nil {
		return err
	}
	defer w.Close()
	taskOf := make(map[string]string, len(js))
	for _, j := range js {
		e, err := prod.Enqueue(ctx, j, w.Channel())
		if err != nil {
			return err
		}
		taskOf[e.ID] = j.TaskID
		w.Add(e)
	}
	var results []jobs.Result
	// The collector warns when no live worker serves the jobs' queue and,
	// interrupted, names the jobs without a result, as for a batch.
	c := newCollector(prod, w, stderr, nil, "")
	for w.Pending() > 0 {
		r, err := c.next(ctx)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				err = errInterrupted
			}
			return c.interrupted(err)
		}
		if r.TaskID == "" {
			r.TaskID = taskOf[r.ID]
		}
		results = append(results, r)
		if o.asJSON {
			if err := writeJSONLine(stdout, r); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintf(stdout, "%s: %s\n", r.TaskID, outcome(r))
	}
	if !o.asJSON {
		fmt.Fprintln(stdout)
		fmt.Fprint(stdout, groupSummary(results))
	}
	for _, r := range results {
		if r.Status != jobs.StatusCompleted || r.ReturnCode != 0 {
			return &app.ExitError{Code: 1}
		}
	}
	return nil
}

// outcome is a result's status in a few words: "completed, rc 0".
func outcome(r jobs.Result) string {
	s := r.Status + ", rc " + strconv.Itoa(r.ReturnCode)
	if r.Status == jobs.StatusError {
		s += ": " + r.Error
	}
	return s
}

// groupSummary counts results by status and return code, then groups the tasks
// whose results are the same (status, return code, output), as dshbak -c
// does:
//
//	50 tasks: 49 completed (rc 0: 48, rc 1: 1), 1 timeout
//
//	eval-42/1,eval-42/3-9 (8 tasks), rc 0:
//	    ok
func groupSummary(results []jobs.Result) string {
	var b strings.Builder
	byStatus := map[string]map[int]int{}
	for _, r := range results {
		if byStatus[r.Status] == nil {
			byStatus[r.Status] = map[int]int{}
		}
		byStatus[r.Status][r.ReturnCode]++
	}
	var parts []string
	for _, st := range []string{jobs.StatusCompleted, jobs.StatusTimeout, jobs.StatusCancelled, jobs.StatusError} {
		rcs := byStatus[st]
		if len(rcs) == 0 {
			continue
		}
		n := 0
		var codes []int
		for rc, c := range rcs {
			n += c
			codes = append(codes, rc)
		}
		slices.Sort(codes)
		part := fmt.Sprintf("%d %s", n, st)
		if st == jobs.StatusCompleted {
			var per []string
			for _, rc := range codes {
				per = append(per, fmt.Sprintf("rc %d: %d", rc, rcs[rc]))
			}
			part += " (" + strings.Join(per, ", ") + ")"
		}
		parts = append(parts, part)
	}
	fmt.Fprintf(&b, "%d %s: %s\n", len(results), plural(len(results), "task"), strings.Join(parts, ", "))

	type key struct {
		status string
		rc     int
		output string
	}
	groups := map[key][]string{}
	for _, r := range results {
		out := r.Output
		if r.Status == jobs.StatusError || r.Status == jobs.StatusTimeout || r.Status == jobs.StatusCancelled {
			out = strings.TrimSuffix(out, "\n")
			if r.Error != "" {
				out = strings.TrimPrefix(out+"\n", "\n") + "(" + r.Error + ")"
			}
		}
		k := key{r.Status, r.ReturnCode, out}
		groups[k] = append(groups[k], r.TaskID)
	}
	keys := make([]key, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	// Largest groups first; then by return code, output.
	slices.SortFunc(keys, func(a, c key) int {
		if d := len(groups[c]) - len(groups[a]); d != 0 {
			return d
		}
		if a.rc != c.rc {
			return a.rc - c.rc
		}
		return strings.Compare(a.output, c.output)
	})
	for _, k := range keys {
		tasks := groups[k]
		head := fmt.Sprintf("%s (%d %s), rc %d", compressTasks(tasks), len(tasks), plural(len(tasks), "task"), k.rc)
		if k.status != jobs.StatusCompleted {
			head += ", " + k.status
		}
		fmt.Fprintf(&b, "\n%s:\n", head)
		out := strings.TrimSuffix(k.output, "\n")
		if out == "" {
			out = "(no output)"
		}
		for _, l := range strings.Split(out, "\n") {
			fmt.Fprintf(&b, "    %s\n", l)
		}
	}
	return b.String()
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}

// compressTasks lists task ids in order, with runs of ids that differ only
// by a trailing number written as a range: eval-42/1,eval-42/3-9.
func compressTasks(tasks []string) string {
	type id struct {
		prefix, digits string
		n              int
		numbered       bool
	}
	ids := make([]id, len(tasks))
	for i, t := range tasks {
		j := len(t)
		for j > 0 && t[j-1] >= '0' && t[j-1] <= '9' {
			j--
		}
		ids[i] = id{prefix: t[:j], digits: t[j:]}
		if n, err := strconv.Atoi(t[j:]); err == nil && len(t)-j <= 9 && (t[j] != '0' || len(t)-j == 1) {
			ids[i].n, ids[i].numbered = n, true
		}
	}
	slices.SortFunc(ids, func(a, b id) int {
		if c := strings.Compare(a.prefix, b.prefix); c != 0 {
			return c
		}
		if a.numbered && b.numbered {
			return a.n - b.n
		}
		return strings.Compare(a.digits, b.digits)
	})
	var parts []string
	for i := 0; i < len(ids); {
		j := i
		for j+1 < len(ids) && ids[i].numbered && ids[j+1].numbered && ids[j+1].prefix == ids[i].prefix && ids[j+1].n == ids[j].n+1 {
			j++
		}
		p := ids[i].prefix + ids[i].digits
		if j > i {
			p += "-" + ids[j].digits
		}
		parts = append(parts, p)
		i = j + 1
	}
	return strings.Join(parts, ",")
}

// terminateMany terminates the tasks' sandboxes (as -terminate -task does,
// for each) and says what happened to them.
func terminateMany(ctx context.Context, o *options, prod *jobs.Producer, tasks []string, stdout, stderr io.Writer) error {
	ids := make([]string, len(tasks))
	for i, task := range tasks {
		id, err := prod.Terminate(ctx, task, o.ifIdle)
		if err != nil {
			return err
		}
		ids[i] = id
	}
	// -wait: until every one is done, as -terminate -task -wait waits.
	wctx, cancel := ctx, func() {}
	if !o.wait {
		wctx, cancel = context.WithTimeout(ctx, terminateWait)
	}
	defer cancel()
	// Not done after a few seconds: say so when no worker is there to do
	// it, as -terminate -task does, and go on waiting.
	waited, checked := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(checked)
		select {
		case <-waited:
		case <-time.After(workerCheckAfter):
			if served, err := prod.QueuesServed(); err == nil && served[jobs.MaintenanceQueue] == 0 {
				fmt.Fprintln(stderr, "enqueue: no live worker is running to do it; still waiting: start one (worker)")
			}
		}
	}()
	outs := make([]jobs.TerminateOutcome, len(tasks))
	errs := make([]error, len(tasks))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for i := range tasks {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			outs[i], errs[i] = prod.WaitTerminate(wctx, ids[i])
		})
	}
	wg.Wait()
	close(waited)
	<-checked
	groups := map[string][]string{}
	for i, task := range tasks {
		status := outs[i].Status
		switch {
		case errors.Is(errs[i], context.DeadlineExceeded):
			status = "not done yet"
		case errs[i] != nil:
			status = "failed: " + errs[i].Error()
		case status == "busy":
			status = "busy: " + outs[i].Reason
		}
		groups[status] = append(groups[status], task)
	}
	statuses := make([]string, 0, len(groups))
	for s := range groups {
		statuses = append(statuses, s)
	}
	slices.Sort(statuses)
	for _, s := range statuses {
		fmt.Fprintf(stdout, "%s (%d %s): %s\n", compressTasks(groups[s]), len(groups[s]), plural(len(groups[s]), "task"), s)
	}
	if len(groups["terminated"]) != len(tasks) && !o.ifIdle {
		return &app.ExitError{Code: 1}
	}
	return nil
}
