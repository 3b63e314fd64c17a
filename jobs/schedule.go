package jobs

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/robfig/cron/v3"

	"github.com/boxq/boxq/sandboxpool"
)

// Recurring schedules (enqueue -schedule).
//
// A schedule is a cron spec and what each of its ticks enqueues: a job for
// one task (-task), a job for each task whose sandbox matches a glob
// (-tasks), or a terminate of each (-terminate). Schedules live in Redis
// (P schedules, a hash: name → JSON), and every worker runs them
// (Scheduler): each worker computes the same tick times, anchored to the
// clock, and derives the id of each tick's jobs from the schedule's name,
// the tick's time and the task, so that however many workers tick, asynq
// takes each job once (its task id is unique; Producer.Enqueue's join
// finds a job that exists). Workers read the schedules again on every
// reap tick: a schedule added, changed or removed takes effect within one
// reap tick, without a restart. Ticks that fell while no worker ran are
// not back-filled: a worker fires only the ticks that fall while it runs
// (the latest one, when it was paused over several).
//
// Keys (P = the prefix, "boxq:"): P schedules (hash, name → Schedule JSON)
// and P schedlast:NAME (string, the schedule's last run: its tick and its
// jobs). Each is one key per command or script: they fit a Redis Cluster
// as they are.

// Schedule is a recurring schedule as stored in Redis.
type Schedule struct {
	Name string `json:"name"`
	// Cron is the spec, as asynq's scheduler takes it: five fields
	// (minute hour day-of-month month day-of-week) or a descriptor
	// (@hourly, @daily, @every 30s, …).
	Cron string `json:"cron"`
	// TZ is the zone the spec is read in (IANA name; default UTC).
	TZ string `json:"tz,omitempty"`
	// Task is the one task each tick runs Job in; Tasks a glob of tasks
	// (sandboxpool.GlobSyntax) matched at each tick. One of the two.
	Task  string `json:"task,omitempty"`
	Tasks string `json:"tasks,omitempty"`
	// Terminate: each tick terminates the tasks' sandboxes (as enqueue
	// -terminate; IfIdle: only those with nothing running or waiting)
	// instead of running a job.
	Terminate bool `json:"terminate,omitempty"`
	IfIdle    bool `json:"if_idle,omitempty"`
	// Job is what each tick runs (its task_id is the task's, its id
	// derived from the tick); nil with Terminate.
	Job *Job `json:"job,omitempty"`
	// UpdatedAt is when the schedule was last set: ticks before it are not
	// its own.
	UpdatedAt time.Time `json:"updated_at"`
}

var scheduleName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$`)

// ParseCron reads a cron spec in a zone ("" is UTC), as Schedule.Validate
// does.
func ParseCron(spec, tz string) (cron.Schedule, *time.Location, error) {
	loc := time.UTC
	if tz != "" {
		var err error
		if loc, err = time.LoadLocation(tz); err != nil {
			return nil, nil, fmt.Errorf("invalid schedule: unknown time zone %q (an IANA name, such as Europe/Paris)", tz)
		}
	}
	if strings.HasPrefix(spec, "TZ=") || strings.HasPrefix(spec, "CRON_TZ=") {
		return nil, nil, errors.New("invalid schedule: give the zone with -tz (the tz field), not in the spec")
	}
	s, err := cron.ParseStandard(spec)
	if err != nil {
		return nil, nil, fmt.Errorf("invalid schedule: cron spec %q: %v (five fields: minute hour day-of-month month day-of-week, or @every 30s, @hourly, @daily …)", spec, err)
	}
	return s, loc, nil
}

// Validate checks a schedule as -schedule takes it.
func (s *Schedule) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("invalid schedule: "+format, args...)
	}
	if !scheduleName.MatchString(s.Name) {
		return bad("name %q: 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit", shorten(s.Name, 120))
	}
	cs, loc, err := ParseCron(s.Cron, s.TZ)
	if err != nil {
		return err
	}
	// robfig looks five years ahead: a spec with no tick in them (the 30th
	// of February) never runs.
	if cs.Next(time.Now().In(loc)).IsZero() {
		return bad("cron spec %q never runs (no such day?)", s.Cron)
	}
	switch {
	case (s.Task == "") == (s.Tasks == ""):
		return bad("give either a task (-task) or a glob of tasks (-tasks)")
	case s.Terminate && s.Job != nil:
		return bad("a terminate schedule runs no command")
	case !s.Terminate && s.Job == nil:
		return bad("a schedule needs a command (or -terminate)")
	case s.IfIdle && !s.Terminate:
		return bad("if_idle goes with terminate")
	}
	if s.Tasks != "" {
		if _, err := sandboxpool.CompileGlob(s.Tasks); err != nil {
			return bad("%v", err)
		}
	}
	if s.Job != nil {
		j := *s.Job
		j.TaskID = cmp.Or(s.Task, "t")
		if j.ID != "" || j.RunAt != nil {
			return bad("a schedule's job has no id or run_at: each tick's job gets its own")
		}
		if err := j.Validate(); err != nil {
			return err
		}
	}
	return nil
}

// scheduleFields names the fields of a schedule's JSON, for the message
// about an unknown one.
const scheduleFields = "name, cron, tz, task, tasks, terminate, if_idle, job, updated_at"

var scheduleFieldNames = strings.Split(scheduleFields, ", ")

// ParseSchedule reads a schedule in the JSON of Schedule (the HTTP API's
// PUT /v1/schedules/{name}) as strictly as ParseJob reads a job: no unknown
// field, no field twice or in another case, in the schedule and in its job,
// then Validate, so its errors are -schedule's. The job's task_id may be
// left out (each tick gives it its task); given, it is the schedule's task
// (as in -schedule -f). updated_at is the store's to set: ignored. name,
// when not "", is the schedule's name (the API's path): the body may leave
// "name" out, or must say the same.
func ParseSchedule(name string, b []byte) (Schedule, error) {
	bad := func(format string, args ...any) (Schedule, error) {
		return Schedule{}, fmt.Errorf("invalid schedule: "+format, args...)
	}
	if !utf8.Valid(b) {
		return bad("the body is not valid UTF-8 (at byte %d); JSON text is UTF-8", invalidUTF8At(b))
	}
	if t := bytes.TrimSpace(b); len(t) == 0 || t[0] != '{' {
		return bad(`a schedule is a JSON object ({"cron": "@every 30s", "task": …, "job": {"command": …}})`)
	}
	// A flat copy of Schedule with the job left raw, so that the job is
	// read by the job's rules.
	var raw struct {
		Name      string          `json:"name"`
		Cron      string          `json:"cron"`
		TZ        string          `json:"tz"`
		Task      string          `json:"task"`
		Tasks     string          `json:"tasks"`
		Terminate bool            `json:"terminate"`
		IfIdle    bool            `json:"if_idle"`
		Job       json.RawMessage `json:"job"`
		UpdatedAt json.RawMessage `json:"updated_at"`
	}
	if err := decodeStrict(b, &raw); err != nil {
		if msg, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return bad("unknown field %s (the fields are %s)", shorten(msg, 60), scheduleFields)
		}
		return bad("%v", bodyError(describeJSONError(err)))
	}
	if err := checkKeys(b, scheduleFieldNames); err != nil {
		return bad("%v", err)
	}
	if name != "" && raw.Name != "" && raw.Name != name {
		return bad("the body names %q, the path %q: leave \"name\" out or make them the same", shorten(raw.Name, 120), shorten(name, 120))
	}
	s := Schedule{Name: cmp.Or(name, raw.Name), Cron: raw.Cron, TZ: raw.TZ, Task: raw.Task, Tasks: raw.Tasks, Terminate: raw.Terminate, IfIdle: raw.IfIdle}
	if len(raw.Job) > 0 && string(raw.Job) != "null" {
		if raw.Job[0] != '{' {
			return bad("field \"job\" must be a JSON object (the job's fields but id and run_at: {\"command\": …})")
		}
		var j Job
		if err := decodeStrict(raw.Job, &j); err != nil {
			if msg, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
				return Schedule{}, fmt.Errorf("invalid job: unknown field %s (a schedule's job takes %s)", shorten(msg, 60), scheduleJobFields)
			}
			return Schedule{}, fmt.Errorf("invalid job: %w", bodyError(describeJSONError(err)))
		}
		if err := checkKeys(raw.Job, jobFieldNames); err != nil {
			return Schedule{}, fmt.Errorf("invalid job: %w", err)
		}
		if s.Task == "" && s.Tasks == "" {
			s.Task = j.TaskID
		}
		if j.TaskID != "" && s.Tasks != "" {
			return bad("the job's task_id %q: a schedule over a glob of tasks runs its job in each task matched; leave task_id out", shorten(j.TaskID, 100))
		}
		if j.TaskID != "" && j.TaskID != s.Task {
			return bad("the job's task_id %q is not the schedule's task %q", shorten(j.TaskID, 100), shorten(s.Task, 100))
		}
		j.TaskID = ""
		s.Job = &j
	}
	if err := s.Validate(); err != nil {
		return Schedule{}, err
	}
	return s, nil
}

// scheduleJobFields names the fields a schedule's job takes: a job's but
// id and run_at (each tick's job gets its own).
const scheduleJobFields = "task_id, command, cwd, timeout_s, stdin, image, cpu, memory_mib, disk_mib, persistent, queue"

// bodyError words describeJSONError's errors, written for a line of a
// batch, for a body.
func bodyError(err error) error {
	if msg, ok := strings.CutPrefix(err.Error(), "the line ends"); ok {
		return errors.New("the body ends" + msg)
	}
	return err
}

// decodeStrict decodes one JSON value with no unknown field.
func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("more than one JSON value")
	}
	return nil
}

// Next returns the schedule's first tick after t. An @every interval
// counts from the Unix epoch in the schedule's zone (robfig's counts from
// each caller's start), so that every worker computes the same ticks.
func (s *Schedule) Next(t time.Time) (time.Time, error) {
	cs, loc, err := ParseCron(s.Cron, s.TZ)
	if err != nil {
		return time.Time{}, err
	}
	return nextTick(cs, loc, t), nil
}

func nextTick(cs cron.Schedule, loc *time.Location, t time.Time) time.Time {
	if every, ok := cs.(cron.ConstantDelaySchedule); ok {
		d := int64(every.Delay / time.Second) // robfig: whole seconds, at least 1
		// Ticks are the instants whose wall clock in loc is a multiple of
		// d, counted with the offset in effect at that instant. Counted
		// with t's offset instead, a tick past a DST change would be off
		// the new grid (@every 24h in Europe/Paris: 23:00 one day, then
		// midnight an hour later).
		at, after := t, t.Unix()
		for n := 0; ; n++ {
			z := at.In(loc)
			_, off := z.Zone()
			_, end := z.ZoneBounds()
			next := (floorDiv(after+int64(off), d)+1)*d - int64(off)
			if end.IsZero() || next < end.Unix() || n == 8 {
				return time.Unix(next, 0).In(loc)
			}
			// The offset changes before next: from the change on, ticks
			// count with the new one.
			at, after = end, max(after, end.Unix()-1)
		}
	}
	if ss, ok := cs.(*cron.SpecSchedule); ok && ss.Hour&cronStarBit == 0 {
		return nextFixedTick(ss, loc, t)
	}
	return cs.Next(t.In(loc))
}

// cronStarBit marks a field of a robfig spec written "*" (its own
// starBit, unexported): "0 * * * *" has it in its hour, "0 2 * * *" not.
const cronStarBit = 1 << 63

// nextFixedTick is the next tick of a spec with fixed hours ("30 2 * * *",
// @daily), as cron runs such jobs across a DST change in their zone: a
// wall time the change repeats runs once, at its first occurrence, and
// one the change skips runs at the change. robfig's Next would run the
// first twice and never the second: a nightly job twice one night a year,
// and not at all another. (A spec with every hour, "0 * * * *", keeps
// robfig's ticks: it runs by the hours that pass.)
func nextFixedTick(ss *cron.SpecSchedule, loc *time.Location, t time.Time) time.Time {
	for {
		n := ss.Next(t.In(loc))
		if n.IsZero() {
			return n
		}
		if change, ok := skippedTick(ss, loc, t, n); ok {
			return change
		}
		if !repeatedWallTime(loc, n) {
			return n
		}
		t = n // its first occurrence was a tick already
	}
}

// skippedTick reports the first change to a larger offset in (t, n] that
// skips a wall time the spec names: the tick runs at the change.
func skippedTick(ss *cron.SpecSchedule, loc *time.Location, t, n time.Time) (time.Time, bool) {
	for at := t; ; {
		z := at.In(loc)
		_, end := z.ZoneBounds()
		if end.IsZero() || end.After(n) {
			return time.Time{}, false
		}
		_, oldOff := z.Zone()
		_, newOff := end.In(loc).Zone()
		if newOff > oldOff {
			// The wall times the change skips, read with the old offset,
			// are the instants [end, end+gap).
			g := ss.Next(end.Add(-time.Second).In(time.FixedZone("", oldOff)))
			if !g.IsZero() && g.Before(end.Add(time.Duration(newOff-oldOff)*time.Second)) {
				return end.In(loc), true
			}
		}
		at = end
	}
}

// repeatedWallTime reports whether t is the second occurrence of its wall
// time in loc: in the hour a change to a smaller offset repeats.
func repeatedWallTime(loc *time.Location, t time.Time) bool {
	z := t.In(loc)
	start, _ := z.ZoneBounds()
	if start.IsZero() {
		return false
	}
	_, off := z.Zone()
	_, prevOff := start.Add(-time.Second).In(loc).Zone()
	return prevOff > off && t.Before(start.Add(time.Duration(prevOff-off)*time.Second))
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

// latestTick returns the last tick in (after, upTo], if any.
//
// It looks back from upTo over growing windows, and stops at the first
// that holds a tick: a worker paused for long (@every 1s over a day)
// fires the latest tick, not one of the first 100,000 after it stopped,
// and walks a few ticks, not the whole gap.
func latestTick(cs cron.Schedule, loc *time.Location, after, upTo time.Time) (time.Time, bool) {
	for w := time.Minute; ; w *= 4 {
		from := upTo.Add(-w)
		if !from.After(after) || w > 1<<20*time.Hour {
			from = after
		}
		var last time.Time
		for t, n := nextTick(cs, loc, from), 0; !t.IsZero() && !t.After(upTo) && n < 100_000; t, n = nextTick(cs, loc, t), n+1 {
			last = t
		}
		if !last.IsZero() || from.Equal(after) {
			return last, !last.IsZero()
		}
	}
}

// ScheduleRun is a schedule's last run.
type ScheduleRun struct {
	Tick    time.Time     `json:"tick"`
	FiredAt time.Time     `json:"fired_at"`
	Jobs    []ScheduleJob `json:"jobs"`
	// More counts jobs beyond those listed (a fan-out over very many tasks
	// keeps the first maxRunJobs).
	More int `json:"more,omitempty"`
	// Error says why the tick enqueued nothing, or not everything.
	Error string `json:"error,omitempty"`
}

// ScheduleJob is one job of a run.
type ScheduleJob struct {
	ID    string `json:"id"`
	Queue string `json:"queue"`
	Task  string `json:"task"`
}

const maxRunJobs = 10_000

func (s store) schedulesKey() string            { return s.prefix + "schedules" }
func (s store) schedLastKey(name string) string { return s.prefix + "schedlast:" + name }

// SetSchedule adds or replaces a schedule. It takes effect within one reap
// tick of the workers.
func (p *Producer) SetSchedule(ctx context.Context, s Schedule) error {
	_, err := p.setSchedule(ctx, s)
	return err
}

// PutSchedule is SetSchedule answering the schedule as it stored it (its
// UpdatedAt set), with its next tick and the last run recorded under its
// name. It does not read the schedule back: another client may have
// replaced or removed it already, and this call's answer is what this
// call did.
func (p *Producer) PutSchedule(ctx context.Context, s Schedule) (ScheduleStatus, error) {
	s, err := p.setSchedule(ctx, s)
	if err != nil {
		return ScheduleStatus{}, err
	}
	return p.scheduleStatus(ctx, s)
}

func (p *Producer) setSchedule(ctx context.Context, s Schedule) (Schedule, error) {
	if err := s.Validate(); err != nil {
		return s, err
	}
	// Redis's clock, not this machine's: ticks before it are not the
	// schedule's, and the workers should agree on when that was.
	now, err := p.rdb.Time(ctx).Result()
	if err != nil {
		return s, fmt.Errorf("jobs: store schedule %q: %w", s.Name, err)
	}
	s.UpdatedAt = now.UTC()
	b, err := json.Marshal(s)
	if err != nil {
		return s, fmt.Errorf("jobs: encode schedule: %w", err)
	}
	if err := p.rdb.HSet(ctx, p.store.schedulesKey(), s.Name, b).Err(); err != nil {
		return s, fmt.Errorf("jobs: store schedule %q: %w", s.Name, err)
	}
	return s, nil
}

// ErrNoSchedule is returned for a schedule name that is not set.
var ErrNoSchedule = errors.New("no such schedule")

// Unschedule removes a schedule (and the record of its last run). Jobs its
// ticks enqueued are left as they are.
func (p *Producer) Unschedule(ctx context.Context, name string) error {
	n, err := p.rdb.HDel(ctx, p.store.schedulesKey(), name).Result()
	if err != nil {
		return fmt.Errorf("jobs: remove schedule %q: %w", name, err)
	}
	if n == 0 {
		return fmt.Errorf("%w: %q", ErrNoSchedule, name)
	}
	p.rdb.Del(ctx, p.store.schedLastKey(name))
	return nil
}

// Schedules returns every schedule, by name.
func (s store) schedules(ctx context.Context) ([]Schedule, error) {
	m, err := s.rdb.HGetAll(ctx, s.schedulesKey()).Result()
	if err != nil {
		return nil, fmt.Errorf("jobs: read schedules: %w", err)
	}
	out := make([]Schedule, 0, len(m))
	for name, v := range m {
		var sc Schedule
		if err := json.Unmarshal([]byte(v), &sc); err != nil {
			return nil, fmt.Errorf("jobs: schedule %q: %w", name, err)
		}
		out = append(out, sc)
	}
	slices.SortFunc(out, func(a, b Schedule) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// ScheduleStatus is a schedule with its next tick and its last run.
type ScheduleStatus struct {
	Schedule
	Next time.Time `json:"next"`
	// Last is nil when no tick has run since the schedule was set.
	Last *ScheduleRun `json:"last,omitempty"`
	// Results counts the last run's jobs by outcome: "completed rc 0",
	// "cancelled rc 130", "terminated", "busy", or their state while they
	// have no result ("pending", "active", …).
	Results map[string]int `json:"results,omitempty"`
}

// Schedules returns every schedule with its next tick and its last run's
// results.
func (p *Producer) Schedules(ctx context.Context) ([]ScheduleStatus, error) {
	defs, err := p.store.schedules(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]ScheduleStatus, 0, len(defs))
	for _, d := range defs {
		st, err := p.scheduleStatus(ctx, d)
		if err != nil {
			return nil, err
		}
		out = append(out, st)
	}
	return out, nil
}

// scheduleStatus adds to d its next tick and its last run.
func (p *Producer) scheduleStatus(ctx context.Context, d Schedule) (ScheduleStatus, error) {
	st := ScheduleStatus{Schedule: d}
	var err error
	if st.Next, err = d.Next(time.Now()); err != nil {
		return st, err
	}
	b, err := p.rdb.Get(ctx, p.store.schedLastKey(d.Name)).Bytes()
	if err != nil && !errors.Is(err, redis.Nil) {
		return st, fmt.Errorf("jobs: read the last run of %q: %w", d.Name, err)
	}
	if err == nil {
		var run ScheduleRun
		if err := json.Unmarshal(b, &run); err != nil {
			return st, fmt.Errorf("jobs: the last run of %q: %w", d.Name, err)
		}
		if !run.Tick.After(d.UpdatedAt) {
			// The run of the schedule this one replaced (under the same
			// name): the workers fire only ticks after UpdatedAt.
			return st, nil
		}
		st.Last = &run
		if st.Results, err = p.runResults(ctx, run.Jobs); err != nil {
			return st, err
		}
	}
	return st, nil
}

// runResults counts the outcomes of a run's jobs.
func (p *Producer) runResults(ctx context.Context, js []ScheduleJob) (map[string]int, error) {
	byQueue := map[string][]string{}
	for _, j := range js {
		byQueue[j.Queue] = append(byQueue[j.Queue], j.ID)
	}
	counts := map[string]int{}
	for q, ids := range byQueue {
		states, err := p.store.lookup(ctx, q, ids)
		if err != nil {
			return nil, err
		}
		for _, st := range states {
			counts[outcomeOf(st)]++
		}
	}
	return counts, nil
}

func outcomeOf(st taskState) string {
	if !st.exists {
		return "gone"
	}
	if st.result == nil {
		return st.state
	}
	var r struct {
		Status     string `json:"status"`
		ReturnCode *int   `json:"returncode"`
	}
	if json.Unmarshal(st.result, &r) != nil || r.Status == "" {
		return "done"
	}
	if r.ReturnCode == nil {
		return r.Status // a terminate's outcome: terminated, busy
	}
	return r.Status + " rc " + strconv.Itoa(*r.ReturnCode)
}

// setLastScript records a schedule's run, unless a later tick's run is
// recorded already (workers write the same run of a tick; a late one must
// not hide a newer tick).
//
// KEYS: 1 P schedlast:NAME. ARGV: 1 tick (unix s), 2 the run's JSON.
var setLastScript = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if cur then
	local ok, run = pcall(cjson.decode, cur)
	if ok and tonumber(run['tick_unix'] or 0) > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
`)

// Scheduler runs the schedules stored in Redis. Every worker runs one.
type Scheduler struct {
	prod   *Producer
	index  *sandboxpool.Index
	reload time.Duration
	now    func() time.Time
	log    *slog.Logger
}

// NewScheduler returns a Scheduler that reads the schedules every reload
// (the reap tick), with the clock now.
func NewScheduler(prod *Producer, index *sandboxpool.Index, reload time.Duration, now func() time.Time, log *slog.Logger) *Scheduler {
	return &Scheduler{prod: prod, index: index, reload: reload, now: now, log: log.With("component", "scheduler")}
}

// Run fires the schedules' ticks until ctx ends.
func (s *Scheduler) Run(ctx context.Context) error {
	last := s.now()
	var (
		defs     []Schedule
		parsed   = map[string]cron.Schedule{}
		locs     = map[string]*time.Location{}
		nextLoad time.Time
	)
	for {
		t := s.now()
		if !t.Before(nextLoad) {
			if d, err := s.prod.store.schedules(ctx); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				s.log.Warn("read schedules", "err", err)
			} else {
				defs = d
				clear(parsed)
				for _, d := range defs {
					cs, loc, err := ParseCron(d.Cron, d.TZ)
					if err != nil {
						s.log.Warn("schedule has a bad spec; skipped", "schedule", d.Name, "err", err)
						continue
					}
					parsed[d.Name], locs[d.Name] = cs, loc
				}
			}
			nextLoad = t.Add(s.reload)
		}
		wake := nextLoad
		for _, d := range defs {
			cs, ok := parsed[d.Name]
			if !ok {
				continue
			}
			from := last
			if d.UpdatedAt.After(from) {
				from = d.UpdatedAt
			}
			if tick, ok := latestTick(cs, locs[d.Name], from, t); ok {
				s.fire(ctx, d, tick)
			}
			// No next tick (zero) leaves the wake as it is: a zero wake
			// would spin the loop.
			if n := nextTick(cs, locs[d.Name], t); !n.IsZero() && n.Before(wake) {
				wake = n
			}
		}
		last = t
		timer := time.NewTimer(max(wake.Sub(s.now()), time.Millisecond))
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil
		case <-timer.C:
		}
	}
}

// fire enqueues one tick's jobs, with ids derived from (schedule, tick,
// task), and records the run.
func (s *Scheduler) fire(ctx context.Context, d Schedule, tick time.Time) {
	log := s.log.With("schedule", d.Name, "tick", tick.UTC().Format(time.RFC3339))
	run := ScheduleRun{Tick: tick.UTC(), FiredAt: time.Now().UTC()}
	tasks := []string{d.Task}
	if d.Tasks != "" {
		g, err := sandboxpool.CompileGlob(d.Tasks)
		if err == nil {
			tasks, err = s.index.Match(ctx, g)
		}
		if err != nil {
			log.Warn("match the schedule's tasks", "err", err)
			run.Error = err.Error()
			tasks = nil
		}
	}
	var firstErr error
	for _, task := range tasks {
		id := TickJobID(d.Name, tick, task, d.Tasks != "", d.Terminate)
		sj := ScheduleJob{ID: id, Queue: DefaultQueue, Task: task}
		var err error
		if d.Terminate {
			sj.Queue = MaintenanceQueue
			err = s.prod.terminateTick(ctx, task, d.IfIdle, id)
		} else {
			j := *d.Job
			j.ID, j.TaskID = id, task
			sj.Queue = j.QueueName()
			_, err = s.prod.Enqueue(ctx, j, "")
		}
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		if len(run.Jobs) < maxRunJobs {
			run.Jobs = append(run.Jobs, sj)
		} else {
			run.More++
		}
	}
	if firstErr != nil {
		log.Warn("enqueue the tick's jobs", "err", firstErr)
		run.Error = firstErr.Error()
	}
	log.Info("schedule tick", "jobs", len(run.Jobs)+run.More)
	if err := s.prod.store.setLast(ctx, d.Name, run); err != nil {
		log.Warn("record the schedule's run", "err", err)
	}
}

func (s store) setLast(ctx context.Context, name string, run ScheduleRun) error {
	b, err := json.Marshal(struct {
		TickUnix int64 `json:"tick_unix"`
		ScheduleRun
	}{run.Tick.Unix(), run})
	if err != nil {
		return fmt.Errorf("jobs: encode run: %w", err)
	}
	return setLastScript.Run(ctx, s.rdb, []string{s.schedLastKey(name)}, run.Tick.Unix(), b).Err()
}

// TickJobID is the id of the job a schedule's tick enqueues for a task:
// the same on every worker, so that the tick's job is enqueued once.
// Long task ids are replaced by their hash, within MaxJobIDBytes.
func TickJobID(name string, tick time.Time, task string, fanOut, terminate bool) string {
	id := "sched:" + name + ":" + strconv.FormatInt(tick.Unix(), 10)
	if terminate {
		id += ":terminate"
	}
	if !fanOut && !terminate {
		return id
	}
	if len(id)+1+len(task) > MaxJobIDBytes {
		sum := sha256.Sum256([]byte(task))
		task = "sha256-" + hex.EncodeToString(sum[:16])
	}
	return id + ":" + task
}

// terminateTick is Terminate for a schedule's tick: with the tick's job
// id, and nothing done when another worker has enqueued it already.
func (p *Producer) terminateTick(ctx context.Context, taskID string, ifIdle bool, id string) error {
	// Looked up where terminate jobs go: another worker's enqueue of the
	// tick must stop this one before its cancels of the task's jobs.
	if n, err := p.rdb.Exists(ctx, taskKey(MaintenanceQueue, id)).Result(); err != nil {
		return fmt.Errorf("jobs: look up %s: %w", id, err)
	} else if n == 1 {
		return nil
	}
	_, err := p.terminate(ctx, taskID, ifIdle, asynq.TaskID(id))
	if errors.Is(err, asynq.ErrTaskIDConflict) {
		return nil
	}
	return err
}
