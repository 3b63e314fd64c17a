package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

// helpScheduling is the part of -help about delays, schedules and
// fan-out.
const helpScheduling = `
Later, on a schedule, over many tasks:
  enqueue [flags] -in 10m|-at 2026-12-03T03:00:00Z -task ID -- COMMAND...
                        one job, run later; it joins its task's order when it
                        falls due, so it holds back none of the task's other
                        jobs while it waits (a JSONL line: "run_at")
  enqueue [flags] -tasks GLOB [-wait] -- COMMAND...  one job per task whose sandbox
                        matches GLOB (fan-out); -wait ends with a summary: counts
                        by status and return code, identical outputs grouped
  enqueue [flags] -tasks-file FILE [-wait] -- COMMAND...   the tasks listed in FILE
                        (one task id per line)
  enqueue [flags] -terminate -tasks GLOB|-tasks-file FILE  end many sandboxes now
  enqueue [flags] -schedule NAME -cron SPEC [-tz ZONE] (-task ID | -tasks GLOB)
                        (-- COMMAND... | -f job.json | -terminate [-if-idle])
                        add or replace a recurring schedule, kept in Redis and run
                        by the workers: each tick runs once across the fleet
  enqueue [flags] -schedules          list schedules: spec, next run, last run
  enqueue [flags] -unschedule NAME    remove a schedule

Cron specs are asynq's: five fields (minute hour day-of-month month
day-of-week: '0 3 * * *') or a descriptor (@hourly, @daily, '@every 30s'),
read in -tz (default UTC). @every ticks at multiples of the interval since
1970-01-01 in the zone, whichever worker computes them. Ticks missed while no
worker ran are not run afterwards. A schedule change takes effect within one
reap tick of the workers (-reap-every).

` + sandboxpool.GlobSyntax + `

A fan-out with no matching task says so and exits 1; with -wait it exits 0
when every command completed with return code 0, else 1.
`

// schedOptions are the flags of schedule.go and fanout.go.
type schedOptions struct {
	in         time.Duration
	at         string
	tasks      string
	tasksFile  string
	schedule   string
	cron       string
	tz         string
	schedules  bool
	unschedule string
}

func (x *schedOptions) register(fs *flag.FlagSet) {
	fs.DurationVar(&x.in, "in", 0, "run the job this long from now (`10m`)")
	fs.StringVar(&x.at, "at", "", "run the job at this `time` (RFC 3339: 2026-12-03T03:00:00Z)")
	fs.StringVar(&x.tasks, "tasks", "", "fan-out: every task whose sandbox matches `GLOB` (see below)")
	fs.StringVar(&x.tasksFile, "tasks-file", "", "fan-out: the tasks listed in `FILE`, one id per line")
	fs.StringVar(&x.schedule, "schedule", "", "add or replace the recurring schedule `NAME` (with -cron)")
	fs.StringVar(&x.cron, "cron", "", "the schedule's cron `SPEC` ('0 3 * * *', '@every 30s')")
	fs.StringVar(&x.tz, "tz", "", "the `zone` -cron is read in (IANA name; default UTC)")
	fs.BoolVar(&x.schedules, "schedules", false, "list the schedules")
	fs.StringVar(&x.unschedule, "unschedule", "", "remove the schedule `NAME`")
}

// handles reports whether the command line is one of schedule.go's or
// fanout.go's modes (-in and -at alone are not: they delay one job).
func (x *schedOptions) handles() bool {
	return x.schedule != "" || x.schedules || x.unschedule != "" || x.tasks != "" || x.tasksFile != "" || x.cron != "" || x.tz != ""
}

// runAt returns the time -in or -at asks for (nil: none).
func (x *schedOptions) runAt(now time.Time) (*time.Time, error) {
	switch {
	case x.in != 0 && x.at != "":
		return nil, app.Usagef("-in and -at both say when: use one")
	case x.in < 0:
		return nil, app.Usagef("-in must be positive, got %v", x.in)
	case x.in > 0:
		t := now.Add(x.in)
		return &t, nil
	case x.at != "":
		t, err := time.Parse(time.RFC3339, x.at)
		if err != nil {
			return nil, app.Usagef("-at %q: not an RFC 3339 time (2026-12-03T03:00:00Z, or with an offset: 2026-12-03T04:00:00+01:00)", x.at)
		}
		return &t, nil
	}
	return nil, nil
}

// runScheduling runs the modes of schedule.go and fanout.go.
func runScheduling(ctx context.Context, o *options, x *schedOptions, stdin io.Reader, stdout, stderr io.Writer) error {
	if err := x.check(o); err != nil {
		return err
	}
	runAt, err := x.runAt(time.Now())
	if err != nil {
		return err
	}
	var sched jobs.Schedule
	if x.schedule != "" {
		// Checked before Redis: a bad spec or zone is the user's to fix.
		if sched, err = buildSchedule(o, x, stdin); err != nil {
			return err
		}
	}
	if x.tasks != "" {
		if _, err := sandboxpool.CompileGlob(x.tasks); err != nil {
			return app.Usagef("-tasks: %v", err)
		}
	}
	log, err := app.NewLogger(stderr, o.logFormat, o.logLevel)
	if err != nil {
		return app.Usagef("%v", err)
	}
	app.RouteRedisLogs(log)
	rdb, err := app.ConnectRedis(ctx, o.redisURL, 0)
	if err != nil {
		return err
	}
	defer rdb.Close()
	prod, err := jobs.NewProducer(rdb, jobs.ProducerConfig{Retention: o.retention, MaxRetry: o.maxRetry, Logger: log})
	if err != nil {
		return err
	}
	switch {
	case x.schedules:
		return listSchedules(ctx, prod, o.asJSON, stdout)
	case x.unschedule != "":
		if err := prod.Unschedule(ctx, x.unschedule); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "schedule %q removed\n", x.unschedule)
		return nil
	case x.schedule != "":
		return setSchedule(ctx, prod, sched, stderr)
	}
	return runFanOut(ctx, o, x, prod, runAt, stdin, stdout, stderr)
}

// check validates the flags of these modes.
func (x *schedOptions) check(o *options) error {
	modes := 0
	for _, on := range []bool{x.schedule != "", x.schedules, x.unschedule != "", o.cancel != "", o.result != ""} {
		if on {
			modes++
		}
	}
	switch {
	case modes > 1:
		return app.Usagef("-schedule, -schedules, -unschedule, -cancel and -result are different modes: use one")
	case o.dev:
		return app.Usagef("-dev starts an empty pool and no lasting worker: schedules and fan-out need a running boxq (-redis)")
	case x.tasks != "" && x.tasksFile != "":
		return app.Usagef("-tasks and -tasks-file both name the tasks: use one")
	case (x.tasks != "" || x.tasksFile != "") && o.task != "":
		return app.Usagef("-task names one task, -tasks and -tasks-file many: use one")
	case x.schedule == "" && (x.cron != "" || x.tz != ""):
		return app.Usagef("-cron and -tz go with -schedule NAME")
	case x.schedule != "" && x.cron == "":
		return app.Usagef("-schedule needs -cron SPEC ('0 3 * * *', '@every 30s')")
	case x.schedule != "" && x.tasksFile != "":
		return app.Usagef("a schedule takes -task ID or -tasks GLOB (matched at each tick), not -tasks-file")
	case x.schedule != "" && (x.in != 0 || x.at != ""):
		return app.Usagef("-in and -at delay one job; a schedule has -cron")
	case x.schedule != "" && o.file != "" && len(o.command) > 0:
		return app.Usagef("with -f the schedule's job comes from the file; drop the command %q", strings.Join(o.command, " "))
	case x.schedule != "" && o.file != "" && o.stdinFile != "":
		return app.Usagef(`with -f the job file gives its stdin (the "stdin" field); drop -stdin-file`)
	case x.schedule != "" && o.terminate && (o.file != "" || len(o.command) > 0):
		return app.Usagef("a -terminate schedule runs no command")
	case (x.schedules || x.unschedule != "") && (len(o.command) > 0 || o.task != "" || x.tasks != ""):
		return app.Usagef("-schedules and -unschedule take no task or command")
	case o.id != "" && x.schedule == "" && !x.schedules && x.unschedule == "":
		return app.Usagef("-id names one job; each job of a fan-out gets its own")
	case o.id != "" && x.schedule != "":
		return app.Usagef("-id names one job; each tick's job gets its own (sched:NAME:TIME)")
	case o.out != "":
		return app.Usagef("-o is for batches (-f)")
	case o.ifIdle && !o.terminate:
		return app.Usagef("-if-idle goes with -terminate")
	case o.timeout <= 0:
		return app.Usagef("-timeout must be positive, got %v", o.timeout)
	case x.schedule == "" && !x.schedules && x.unschedule == "" && o.file != "":
		return app.Usagef("-f is a batch; -tasks and -tasks-file fan one command out (or use -f with -schedule)")
	case x.schedule == "" && !x.schedules && x.unschedule == "" && !o.terminate && len(o.command) == 0:
		return app.Usagef("missing command: enqueue -tasks GLOB -- COMMAND...")
	}
	return nil
}

// template returns the job the flags describe, without a task: the
// command line's, or -f's single JSON object.
func template(o *options, stdin io.Reader) (jobs.Job, error) {
	if o.file != "" {
		b, err := readJobFile(o.file, stdin)
		if err != nil {
			return jobs.Job{}, err
		}
		var j jobs.Job
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&j); err != nil {
			return jobs.Job{}, app.Usagef("-f %s: invalid job: %v", o.file, err)
		}
		// The file is a batch's line: the flags given fill what it lacks.
		defaultsFrom(o).apply(&j)
		return j, nil
	}
	j := jobs.Job{Command: strings.Join(o.command, " "), Cwd: o.cwd, Image: o.image, Queue: o.queue, Persistent: &o.persist}
	secs := o.timeout.Seconds()
	j.TimeoutS = &secs
	if o.stdinFile != "" {
		// As for one job: a file that cannot be read is a usage error.
		b, err := readStdin(o.stdinFile, stdin)
		if err != nil {
			return jobs.Job{}, err
		}
		j.Stdin = b
	}
	return j, nil
}

func readJobFile(path string, stdin io.Reader) ([]byte, error) {
	if path == "-" {
		return io.ReadAll(io.LimitReader(stdin, maxLineBytes))
	}
	b, err := readLimited(path, maxLineBytes)
	if err != nil {
		return nil, app.Usagef("-f: %v", err)
	}
	return b, nil
}

// buildSchedule returns the schedule the flags describe, checked.
func buildSchedule(o *options, x *schedOptions, stdin io.Reader) (jobs.Schedule, error) {
	s := jobs.Schedule{Name: x.schedule, Cron: x.cron, TZ: x.tz, Task: o.task, Tasks: x.tasks, Terminate: o.terminate, IfIdle: o.ifIdle}
	if !o.terminate {
		j, err := template(o, stdin)
		if err != nil {
			return s, err
		}
		if s.Task == "" && s.Tasks == "" {
			s.Task = j.TaskID // a job file may name its task
		}
		if j.TaskID != "" && j.TaskID != s.Task {
			return s, app.Usagef("the job file's task_id %q is not the schedule's task %q", j.TaskID, s.Task)
		}
		j.TaskID = ""
		s.Job = &j
	}
	if err := s.Validate(); err != nil {
		return s, app.Usagef("%v", err)
	}
	return s, nil
}

func setSchedule(ctx context.Context, prod *jobs.Producer, s jobs.Schedule, stderr io.Writer) error {
	if err := prod.SetSchedule(ctx, s); err != nil {
		return err
	}
	next, err := s.Next(time.Now())
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "schedule %q set; next run %s\n", s.Name, next.Format(time.RFC3339))
	return nil
}

// listSchedules prints the schedules: a table, or JSON lines.
func listSchedules(ctx context.Context, prod *jobs.Producer, asJSON bool, stdout io.Writer) error {
	sts, err := prod.Schedules(ctx)
	if err != nil {
		return err
	}
	if asJSON {
		for _, st := range sts {
			if err := writeJSONLine(stdout, st); err != nil {
				return err
			}
		}
		return nil
	}
	if len(sts) == 0 {
		fmt.Fprintln(stdout, "no schedules")
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tCRON\tTZ\tRUNS\tNEXT\tLAST RUN")
	for _, st := range sts {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", st.Name, st.Cron, cmp.Or(st.TZ, "UTC"), target(st.Schedule),
			st.Next.Format(time.RFC3339), lastRun(st))
	}
	return tw.Flush()
}

// target says what a schedule's ticks do.
func target(s jobs.Schedule) string {
	tasks := "-task " + shellQuote(s.Task)
	if s.Tasks != "" {
		tasks = "-tasks " + shellQuote(s.Tasks)
	}
	if s.Terminate {
		if s.IfIdle {
			return "terminate -if-idle " + tasks
		}
		return "terminate " + tasks
	}
	cmd := s.Job.Command
	if len(cmd) > 40 {
		cmd = cmd[:37] + "..."
	}
	return tasks + " -- " + cmd
}

// lastRun sums up a schedule's last run: its tick, and its jobs' outcomes.
func lastRun(st jobs.ScheduleStatus) string {
	if st.Last == nil {
		return "-"
	}
	n := len(st.Last.Jobs) + st.Last.More
	s := fmt.Sprintf("%s: %d job", st.Last.Tick.Format(time.RFC3339), n)
	if n != 1 {
		s += "s"
	}
	keys := make([]string, 0, len(st.Results))
	for k := range st.Results {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%d %s", st.Results[k], k))
	}
	if len(parts) > 0 {
		s += " (" + strings.Join(parts, ", ") + ")"
	}
	if st.Last.Error != "" {
		s += "; error: " + st.Last.Error
	}
	return s
}

func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:@") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func readTasksFile(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, app.Usagef("-tasks-file: %v", err)
	}
	seen := map[string]bool{}
	var tasks []string
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimRight(l, "\r")
		if strings.TrimSpace(l) == "" || seen[l] {
			continue
		}
		seen[l] = true
		tasks = append(tasks, l)
	}
	return tasks, nil
}
