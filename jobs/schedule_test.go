package jobs_test

import (
	"context"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

// TestScheduleTicksAnchoredToTheClock: @every ticks are multiples of the
// interval since the epoch (in the zone), whoever asks and from when; cron
// specs are read in their zone.
func TestScheduleTicksAnchoredToTheClock(t *testing.T) {
	every3 := jobs.Schedule{Name: "e", Cron: "@every 3s"}
	base := time.Date(2026, 12, 3, 3, 0, 0, 0, time.UTC)
	var grids [][]time.Time
	for _, start := range []time.Time{base.Add(100 * time.Millisecond), base.Add(1100 * time.Millisecond), base.Add(2900 * time.Millisecond)} {
		var grid []time.Time
		for at := start; len(grid) < 3; {
			n, err := every3.Next(at)
			if err != nil {
				t.Fatal(err)
			}
			grid = append(grid, n.UTC())
			at = n
		}
		grids = append(grids, grid)
	}
	want := []time.Time{base.Add(3 * time.Second), base.Add(6 * time.Second), base.Add(9 * time.Second)}
	for i, g := range grids {
		if !slices.Equal(g, want) {
			t.Errorf("start %d: ticks %v, want %v", i, g, want)
		}
	}
	tests := []struct {
		s     jobs.Schedule
		after time.Time
		want  time.Time
	}{
		{jobs.Schedule{Cron: "@every 24h", TZ: "Asia/Kolkata"}, base, time.Date(2026, 12, 3, 0, 0, 0, 0, mustZone(t, "Asia/Kolkata")).Add(24 * time.Hour)},
		{jobs.Schedule{Cron: "0 3 * * *"}, base, base.Add(24 * time.Hour)},
		{jobs.Schedule{Cron: "0 3 * * *", TZ: "America/New_York"}, base, time.Date(2026, 12, 3, 3, 0, 0, 0, mustZone(t, "America/New_York"))},
		{jobs.Schedule{Cron: "@hourly"}, base.Add(time.Second), base.Add(time.Hour)},
	}
	for _, tt := range tests {
		got, err := tt.s.Next(tt.after)
		if err != nil {
			t.Fatal(err)
		}
		if !got.Equal(tt.want) {
			t.Errorf("%q in %q after %v: %v, want %v", tt.s.Cron, tt.s.TZ, tt.after, got, tt.want)
		}
	}
}

// TestScheduleEveryInZoneAcrossDST: @every 24h in a zone with daylight
// saving ticks at local midnight on both sides of each change, never at
// 23:00 or 01:00 in between, whoever asks and from when.
func TestScheduleEveryInZoneAcrossDST(t *testing.T) {
	paris := mustZone(t, "Europe/Paris")
	s := jobs.Schedule{Name: "midnight", Cron: "@every 24h", TZ: "Europe/Paris"}
	for _, from := range []time.Time{
		time.Date(2026, 10, 23, 12, 0, 0, 0, paris), // clocks go back on the 25th
		time.Date(2027, 3, 26, 12, 0, 0, 0, paris),  // forward on the 28th
	} {
		for at, n := from, 0; n < 5; n++ {
			next, err := s.Next(at)
			if err != nil {
				t.Fatal(err)
			}
			local := next.In(paris)
			want := time.Date(from.Year(), from.Month(), from.Day()+n+1, 0, 0, 0, 0, paris)
			if !next.Equal(want) {
				t.Errorf("after %v: tick %v (%v), want %v", at.In(paris), next.UTC(), local, want)
			}
			// Asked from anywhere between two ticks, the same next tick.
			if mid, err := s.Next(next.Add(-90 * time.Minute)); err != nil || !mid.Equal(next) {
				t.Errorf("after %v: tick %v, want %v", next.Add(-90*time.Minute).In(paris), mid.In(paris), local)
			}
			at = next
		}
	}
}

// TestScheduleFixedTimeAcrossDST: a nightly spec in a zone runs once a
// night across DST changes, as cron does: once in the night a wall time
// repeats (its first occurrence), and at the change in the night it skips
// that time. A spec with every hour keeps running by the hours that pass.
func TestScheduleFixedTimeAcrossDST(t *testing.T) {
	mustZone(t, "Europe/Paris")
	mustZone(t, "America/New_York")
	utc := func(y int, m time.Month, d, h, min int) time.Time { return time.Date(y, m, d, h, min, 0, 0, time.UTC) }
	tests := []struct {
		cron, tz string
		from     time.Time
		want     []time.Time
	}{
		// 02:00-03:00 repeats on 2026-10-25 in Paris: once, at 02:00 CEST.
		{"0 2 * * *", "Europe/Paris", utc(2026, 10, 24, 12, 0), []time.Time{utc(2026, 10, 25, 0, 0), utc(2026, 10, 26, 1, 0)}},
		// Asked from between the two 02:00s: the next night.
		{"0 2 * * *", "Europe/Paris", utc(2026, 10, 25, 0, 30), []time.Time{utc(2026, 10, 26, 1, 0)}},
		// 02:00-03:00 is skipped on 2027-03-28: at the change, 03:00 CEST.
		{"30 2 * * *", "Europe/Paris", utc(2027, 3, 27, 12, 0), []time.Time{utc(2027, 3, 28, 1, 0), utc(2027, 3, 29, 0, 30)}},
		{"30 1 * * *", "America/New_York", utc(2026, 10, 31, 12, 0), []time.Time{utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)}},
		{"30 2 * * *", "America/New_York", utc(2027, 3, 13, 12, 0), []time.Time{utc(2027, 3, 14, 7, 0), utc(2027, 3, 15, 6, 30)}},
		// Every hour: both 02:00s, as hours pass.
		{"0 * * * *", "Europe/Paris", utc(2026, 10, 24, 23, 30), []time.Time{utc(2026, 10, 25, 0, 0), utc(2026, 10, 25, 1, 0), utc(2026, 10, 25, 2, 0)}},
	}
	for _, tt := range tests {
		s := jobs.Schedule{Name: "n", Cron: tt.cron, TZ: tt.tz}
		at := tt.from
		for _, want := range tt.want {
			got, err := s.Next(at)
			if err != nil {
				t.Fatal(err)
			}
			if !got.Equal(want) {
				t.Errorf("%q in %s after %v: %v, want %v", tt.cron, tt.tz, at.UTC(), got.UTC(), want)
				break
			}
			at = got
		}
	}
}

func mustZone(t *testing.T, name string) *time.Location {
	t.Helper()
	loc, err := time.LoadLocation(name)
	if err != nil {
		t.Skipf("no zone data: %v", err)
	}
	return loc
}

func TestScheduleValidate(t *testing.T) {
	job := &jobs.Job{Command: "true"}
	tests := []struct {
		s    jobs.Schedule
		want string
	}{
		{jobs.Schedule{Name: "a", Cron: "61 * * * *", Task: "t", Job: job}, "cron spec"},
		{jobs.Schedule{Name: "a", Cron: "@every 1s", TZ: "Mars/Olympus", Task: "t", Job: job}, "unknown time zone"},
		{jobs.Schedule{Name: "a b", Cron: "@every 1s", Task: "t", Job: job}, "name"},
		{jobs.Schedule{Name: "a", Cron: "@every 1s", Job: job}, "either a task"},
		{jobs.Schedule{Name: "a", Cron: "@every 1s", Tasks: "x[", Job: job}, "without its ]"},
		{jobs.Schedule{Name: "a", Cron: "@every 1s", Task: "t"}, "needs a command"},
		{jobs.Schedule{Name: "a", Cron: "@every 1s", Task: "t", Terminate: true, Job: job}, "runs no command"},
	}
	for _, tt := range tests {
		if err := tt.s.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Validate(%+v) = %v, want an error with %q", tt.s, err, tt.want)
		}
	}
	ok := jobs.Schedule{Name: "nightly", Cron: "0 3 * * *", TZ: "Europe/Paris", Tasks: "**", Terminate: true}
	if err := ok.Validate(); err != nil {
		t.Errorf("Validate(%+v) = %v", ok, err)
	}
}

// TestScheduleEachTickOnceAcrossWorkers: @every 2s, three workers started
// at different times, the first stopped after 6.3 s, for 10 s: 5 ± 1
// runs, each tick once, counted from the commands themselves.
func TestScheduleEachTickOnceAcrossWorkers(t *testing.T) {
	s := newStack(t, stackOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	err := s.prod.SetSchedule(ctx, jobs.Schedule{Name: "ticks", Cron: "@every 2s", Task: "sched",
		Job: &jobs.Job{Command: "date +%s >> ~/ticks"}})
	if err != nil {
		t.Fatal(err)
	}
	fast := func(c *jobs.WorkerConfig) { c.ReapEvery = 500 * time.Millisecond }
	start := time.Now()
	stopFirst := s.startWorker(t, fast)
	time.Sleep(1300 * time.Millisecond)
	s.startWorker(t, fast)
	time.Sleep(1900 * time.Millisecond)
	s.startWorker(t, fast)
	// The first worker, which may be the one firing, stops mid-run: the
	// other two go on without a gap or a double.
	time.Sleep(time.Until(start.Add(6300 * time.Millisecond)))
	stopFirst()
	time.Sleep(time.Until(start.Add(10 * time.Second)))
	if err := s.prod.Unschedule(ctx, "ticks"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // one reload: no worker ticks any more
	// A worker held up longer (a loaded machine) may still fire the tick
	// it was about to: read the runs again until no tick job came in
	// while they were read.
	var ids, lines []string
	for range 5 {
		ids = tickJobs(t, s, "sched:ticks:")
		waitFor(t, 20*time.Second, "the tick jobs to end", func() bool {
			for _, id := range ids {
				if info := taskInfo(t, s.rdb, id); len(info.Result) == 0 {
					return false
				}
			}
			return true
		})
		r := s.run1(t, jobs.Job{TaskID: "sched", Command: "cat ~/ticks"})
		lines = strings.Fields(r.Output)
		if len(tickJobs(t, s, "sched:ticks:")) == len(ids) {
			break
		}
	}
	t.Logf("ticks run: %q; tick jobs: %q", lines, ids)
	if len(lines) < 4 || len(lines) > 6 {
		t.Errorf("%d runs in 10 s of @every 2s, want 5 ± 1", len(lines))
	}
	if len(lines) != len(ids) {
		t.Errorf("%d runs, %d tick jobs: a tick ran twice or not at all", len(lines), len(ids))
	}
	// The seconds the commands printed, against the ticks: a loaded
	// machine may run a tick's job late (it then prints a later tick's
	// second), never early. Sorted, the i-th run is at or after the i-th
	// tick: a run before its tick, or two runs for one tick while another
	// tick never ran, breaks that.
	ticks := make([]string, len(ids))
	for i, id := range ids {
		ticks[i] = id[strings.LastIndex(id, ":")+1:]
	}
	runs := slices.Sorted(slices.Values(lines))
	for i := range min(len(runs), len(ticks)) {
		run, rerr := strconv.ParseInt(runs[i], 10, 64)
		tick, terr := strconv.ParseInt(ticks[i], 10, 64)
		if rerr != nil || terr != nil {
			t.Errorf("run %q, tick %q: not both seconds", runs[i], ticks[i])
		} else if run < tick {
			t.Errorf("run %d printed second %d, before tick %d", i, run, tick)
		}
	}
	for _, id := range ids {
		sec := id[strings.LastIndex(id, ":")+1:]
		if n := len(sec); n == 0 || (sec[n-1]-'0')%2 != 0 {
			t.Errorf("tick job %s: not on the 2 s grid", id)
		}
	}
}

// tickJobs lists the ids of the jobs whose id starts with prefix, in the
// default queue.
func tickJobs(t *testing.T, s *stack, prefix string) []string {
	t.Helper()
	return redistest.TaskIDs(t, s.rdb, jobs.DefaultQueue, prefix)
}

// TestScheduleChangedAndRemovedWhileWorkersRun: a changed schedule runs
// its new command from the next reload on, a removed one stops, without a
// restart.
func TestScheduleChangedAndRemovedWhileWorkersRun(t *testing.T) {
	s := newStack(t, stackOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	fast := func(c *jobs.WorkerConfig) { c.ReapEvery = 300 * time.Millisecond }
	s.startWorker(t, fast)
	s.startWorker(t, fast)
	set := func(cmd string) {
		t.Helper()
		if err := s.prod.SetSchedule(ctx, jobs.Schedule{Name: "chg", Cron: "@every 1s", Task: "chg", Job: &jobs.Job{Command: cmd}}); err != nil {
			t.Fatal(err)
		}
	}
	log := func() []string {
		r := s.run1(t, jobs.Job{TaskID: "chg", Command: "cat ~/log 2>/dev/null; true"})
		return strings.Fields(r.Output)
	}
	count := func(lines []string, w string) (n int) {
		for _, l := range lines {
			if l == w {
				n++
			}
		}
		return n
	}
	set("echo a >> ~/log")
	waitFor(t, 15*time.Second, "two runs of the schedule", func() bool { return count(log(), "a") >= 2 })
	set("echo b >> ~/log")
	waitFor(t, 15*time.Second, "three runs of the changed schedule", func() bool { return count(log(), "b") >= 3 })
	if l := log(); l[len(l)-1] != "b" || l[len(l)-2] != "b" {
		t.Errorf("the old command still runs after the change: %q", l)
	}
	if err := s.prod.Unschedule(ctx, "chg"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // a reload, and a tick in flight
	n := len(log())
	time.Sleep(2500 * time.Millisecond)
	if got := len(log()); got != n {
		t.Errorf("the removed schedule still runs: %d runs, then %d", n, got)
	}
	if err := s.prod.Unschedule(ctx, "chg"); err == nil {
		t.Errorf("Unschedule of a removed schedule: no error")
	}
}

// TestScheduleTerminateTickOnce: a terminate schedule's tick job lives in
// the maintenance queue. A second worker firing the same tick finds it
// there and does nothing: it does not cancel again the task's jobs
// enqueued since, and the schedule's last run finds its job.
func TestScheduleTerminateTickOnce(t *testing.T) {
	s := newStack(t, stackOptions{}) // no worker: the jobs stay where they are
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d := jobs.Schedule{Name: "term", Cron: "@every 1h", Task: "tt", Terminate: true}
	if err := s.prod.SetSchedule(ctx, d); err != nil {
		t.Fatal(err)
	}
	sch := jobs.NewScheduler(s.prod, sandboxpool.NewIndex(s.rdb, "boxq:"), time.Hour, time.Now, slog.New(slog.DiscardHandler))
	// A tick of the schedule's own, after it was set (the workers fire no
	// other; an earlier one would be the run of a schedule it replaced).
	tick, err := d.Next(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	jobs.FireSchedule(ctx, sch, d, tick)
	// After the tick: the task's next jobs, the second waiting its turn.
	var ids []string
	for range 2 {
		e, err := s.prod.Enqueue(ctx, jobs.Job{TaskID: "tt", Command: "true"}, "")
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, e.ID)
	}
	jobs.FireSchedule(ctx, sch, d, tick) // another worker, the same tick
	for _, id := range ids {
		st, err := s.prod.Status(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if st.State == jobs.StateDone {
			t.Errorf("job %s, enqueued after the tick, has a result: %+v (the tick ran twice)", id, st.Result)
		}
	}
	sts, err := s.prod.Schedules(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(sts) != 1 || sts[0].Last == nil || len(sts[0].Last.Jobs) != 1 {
		t.Fatalf("schedules: %+v, want term's last run with its job", sts)
	}
	if n := sts[0].Results["gone"]; n > 0 || len(sts[0].Results) != 1 {
		t.Errorf("the last run's results: %v, want the terminate job's state (not gone)", sts[0].Results)
	}
}

// TestParseSchedule: a schedule's JSON (the API's PUT body) is read as
// strictly as a job, in the schedule and in its job, and checked as
// -schedule checks it; the job's task_id stands for the task, as in
// -schedule -f.
func TestParseSchedule(t *testing.T) {
	s, err := jobs.ParseSchedule("n", []byte(`{"cron":"@every 1s","job":{"task_id":"t1","command":"true","timeout_s":5}}`))
	if err != nil {
		t.Fatal(err)
	}
	if s.Name != "n" || s.Task != "t1" || s.Job == nil || s.Job.TaskID != "" || s.Job.Command != "true" || *s.Job.TimeoutS != 5 {
		t.Errorf("ParseSchedule = %+v; want name n, task t1, the job without its task_id", s)
	}
	if s, err := jobs.ParseSchedule("", []byte(`{"name":"b","cron":"@daily","tasks":"**","terminate":true,"updated_at":"2020-01-01T00:00:00Z"}`)); err != nil ||
		s.Name != "b" || !s.UpdatedAt.IsZero() {
		t.Errorf("ParseSchedule = %+v, %v; want the body's name and no updated_at", s, err)
	}
	for _, tt := range []struct{ body, want string }{
		{`{"cron":"@daily","task":"t","job":{"command":"true","command":"false"}}`, `invalid job: field "command" is given twice`},
		{`{"cron":"@daily","task":"t","job":{"Command":"true"}}`, `invalid job: field "Command" is spelled "command"`},
		{`{"cron":"@daily","task":"t","task":"u","job":{"command":"true"}}`, `invalid schedule: field "task" is given twice`},
		{`{"cron":"@daily","task":"t","job":{"command":"true"},"nope":1}`, `invalid schedule: unknown field "nope" (the fields are name, cron`},
		{`{"cron":5,"task":"t","job":{"command":"true"}}`, `invalid schedule: field "cron" must be a string, not a number`},
		{`{"cron":"@daily","task":"t","job":{"task_id":"u","command":"true"}}`, `the job's task_id "u" is not the schedule's task "t"`},
		{`{"cron":"@daily","task":"t","job":"true"}`, `field "job" must be a JSON object`},
		{`{"cron":"@daily","task":"t","job":{"command":"true","run_at":"2030-01-01T00:00:00Z"}}`, "no id or run_at"},
		{`{"name":"m","cron":"@daily","task":"t","job":{"command":"true"}}`, `the body names "m", the path "n"`},
		{`{"cron":"@daily","task":"t","job":{"command":"true"}} {}`, "more than one JSON value"},
		{"{\"cron\":\"@daily\xff\"}", "not valid UTF-8"},
		{`{"cron":"@daily","task":"t","job":{"command":"true","tmeout_s":3}}`, `invalid job: unknown field "tmeout_s" (a schedule's job takes task_id, command, cwd, timeout_s,`},
		{`{"cron":"@daily","tasks":"e*","job":{"task_id":"x","command":"true"}}`, `the job's task_id "x": a schedule over a glob of tasks runs its job in each task matched; leave task_id out`},
		{`{"cron":"@daily","task":"t","job":{"command":"true"`, "the body ends inside a JSON value"},
		{`{"cron":"@daily","task":"t"`, "invalid schedule: the body ends inside a JSON value"},
	} {
		if _, err := jobs.ParseSchedule("n", []byte(tt.body)); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseSchedule(%s) = %v; want an error with %q", tt.body, err, tt.want)
		}
	}
}
