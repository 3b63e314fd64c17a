package main

import (
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
)

// schedulesJSON is what GET /v1/schedules answers.
type schedulesJSON struct {
	Schedules []jobs.ScheduleStatus `json:"schedules"`
}

// TestSchedulesRoutes, against Redis, the reference gateway and a worker:
// a schedule set with PUT is listed by GET with its next tick; a bad spec,
// zone or body is a 400 with -schedule's words; the schedule's @every 1s
// ticks run in a worker, and their jobs' results show in the list's last
// run and at GET /v1/jobs/{id}; after DELETE (204) it is gone from GET, a
// second DELETE is 404, and no tick later than the removal is enqueued.
func TestSchedulesRoutes(t *testing.T) {
	const tok = "sched-token"
	st := newAPIStack(t, tok)
	const reload = 300 * time.Millisecond
	st.startWorkerEvery(t, reload)
	c := http.DefaultClient
	var e struct{ Error string }

	var list schedulesJSON
	if code := do(t, c, "GET", st.url+"/v1/schedules", tok, "", &list); code != http.StatusOK || list.Schedules == nil || len(list.Schedules) != 0 {
		t.Fatalf("GET /v1/schedules with none: %d %+v; want 200 and an empty list", code, list)
	}

	job := &jobs.Job{Command: "true"}
	for _, tt := range []struct {
		name, body string
		want       jobs.Schedule // its Validate error is the CLI's words, and the API's
	}{
		{"bad spec", `{"cron":"61 * * * *","task":"t","job":{"command":"true"}}`, jobs.Schedule{Name: "bad", Cron: "61 * * * *", Task: "t", Job: job}},
		{"bad zone", `{"cron":"@daily","tz":"Mars/Olympus","task":"t","job":{"command":"true"}}`, jobs.Schedule{Name: "bad", Cron: "@daily", TZ: "Mars/Olympus", Task: "t", Job: job}},
		{"no task", `{"cron":"@daily","job":{"command":"true"}}`, jobs.Schedule{Name: "bad", Cron: "@daily", Job: job}},
		{"no command", `{"cron":"@daily","task":"t"}`, jobs.Schedule{Name: "bad", Cron: "@daily", Task: "t"}},
	} {
		werr := tt.want.Validate()
		if werr == nil {
			t.Fatalf("%s: %+v validates", tt.name, tt.want)
		}
		if code := do(t, c, "PUT", st.url+"/v1/schedules/bad", tok, tt.body, &e); code != http.StatusBadRequest || e.Error != werr.Error() {
			t.Errorf("%s: %d %q; want 400 %q", tt.name, code, e.Error, werr)
		}
	}
	for _, tt := range []struct{ name, path, body, want string }{
		{"unknown field", "bad", `{"cron":"@daily","task":"t","comand":"true"}`, `invalid schedule: unknown field "comand"`},
		{"field in another case", "bad", `{"cron":"@daily","Task":"t","job":{"command":"true"}}`, `is spelled "task"`},
		{"unknown job field", "bad", `{"cron":"@daily","task":"t","job":{"command":"true","tmeout_s":3}}`, `invalid job: unknown field "tmeout_s"`},
		{"job with an id", "bad", `{"cron":"@daily","task":"t","job":{"id":"j","command":"true"}}`, "each tick's job gets its own"},
		{"names differ", "bad", `{"name":"other","cron":"@daily","task":"t","job":{"command":"true"}}`, `the body names "other", the path "bad"`},
		{"bad name", "a%20b", `{"cron":"@daily","task":"t","job":{"command":"true"}}`, `invalid schedule: name "a b"`},
		{"not an object", "bad", `"@daily"`, "a schedule is a JSON object"},
	} {
		if code := do(t, c, "PUT", st.url+"/v1/schedules/"+tt.path, tok, tt.body, &e); code != http.StatusBadRequest || !strings.Contains(e.Error, tt.want) {
			t.Errorf("%s: %d %q; want 400 with %q", tt.name, code, e.Error, tt.want)
		}
	}
	if code := do(t, c, "GET", st.url+"/v1/schedules", tok, "", &list); code != http.StatusOK || len(list.Schedules) != 0 {
		t.Errorf("after refused PUTs: %d %+v; want no schedule", code, list.Schedules)
	}

	// A nightly one, in a zone, over a glob: listed as set, next tick read
	// in the zone.
	var got jobs.ScheduleStatus
	nightly := `{"cron":"0 3 * * *","tz":"UTC","tasks":"eval-*/**","terminate":true,"if_idle":true}`
	if code := do(t, c, "PUT", st.url+"/v1/schedules/nightly", tok, nightly, &got); code != http.StatusOK {
		t.Fatalf("PUT nightly: %d %+v", code, got)
	}
	if got.Name != "nightly" || got.Tasks != "eval-*/**" || !got.Terminate || !got.IfIdle || got.Job != nil ||
		got.Next.Hour() != 3 || got.Next.Minute() != 0 || got.UpdatedAt.IsZero() || got.Last != nil {
		t.Errorf("PUT nightly answered %+v; want the schedule as stored, next at 03:00", got)
	}

	// A tick a second: the worker runs it.
	const task = "sched-api"
	body := `{"cron":"@every 1s","task":"` + task + `","job":{"command":"echo tick; pwd","cwd":"/tmp","timeout_s":30}}`
	if code := do(t, c, "PUT", st.url+"/v1/schedules/tick", tok, body, &got); code != http.StatusOK {
		t.Fatalf("PUT tick: %d %+v", code, got)
	}
	if got.Name != "tick" || got.Cron != "@every 1s" || got.Task != task || got.Job == nil || got.Job.Command != "echo tick; pwd" ||
		got.Job.Cwd != "/tmp" || got.Job.TaskID != "" || got.Next.IsZero() {
		t.Errorf("PUT tick answered %+v", got)
	}
	var last jobs.ScheduleStatus
	deadline := time.Now().Add(60 * time.Second)
	for {
		if code := do(t, c, "GET", st.url+"/v1/schedules", tok, "", &list); code != http.StatusOK {
			t.Fatalf("GET /v1/schedules: %d", code)
		}
		names := []string{}
		for _, s := range list.Schedules {
			names = append(names, s.Name)
			if s.Name == "tick" {
				last = s
			}
		}
		if !slices.Equal(names, []string{"nightly", "tick"}) {
			t.Fatalf("schedules listed: %q; want nightly and tick, by name", names)
		}
		if last.Last != nil && last.Results["completed rc 0"] > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no tick of @every 1s completed within 60s: %+v", last)
		}
		time.Sleep(50 * time.Millisecond) // observing another party: the worker's scheduler
	}
	if len(last.Last.Jobs) != 1 || last.Last.Jobs[0].Task != task || last.Last.Tick.IsZero() {
		t.Fatalf("last run %+v; want one job in %s", last.Last, task)
	}
	tickID := last.Last.Jobs[0].ID
	if want := jobs.TickJobID("tick", last.Last.Tick, task, false, false); tickID != want {
		t.Errorf("tick job id %q; want %q", tickID, want)
	}
	var res jobs.Result
	if code := do(t, c, "GET", st.url+"/v1/jobs/"+tickID, tok, "", &res); code != http.StatusOK ||
		res.TaskID != task || res.Status != jobs.StatusCompleted || res.Output != "tick\n/tmp\n" {
		t.Errorf("GET /v1/jobs/%s: %d %+v; want the tick's completed result", tickID, code, res)
	}

	// Removed: gone from the list, and no tick after the removal runs.
	if code := do(t, c, "DELETE", st.url+"/v1/schedules/tick", tok, "", nil); code != http.StatusNoContent {
		t.Fatalf("DELETE tick: %d; want 204", code)
	}
	removed := time.Now()
	if code := do(t, c, "DELETE", st.url+"/v1/schedules/tick", tok, "", &e); code != http.StatusNotFound || !strings.Contains(e.Error, "no such schedule") {
		t.Errorf("second DELETE: %d %q; want 404 no such schedule", code, e.Error)
	}
	if code := do(t, c, "GET", st.url+"/v1/schedules", tok, "", &list); code != http.StatusOK || len(list.Schedules) != 1 || list.Schedules[0].Name != "nightly" {
		t.Errorf("after DELETE: %d %+v; want nightly alone", code, list.Schedules)
	}
	// A worker fires a tick only with schedules read less than one reload
	// before: no tick after removed+reload can be enqueued. Three ticks'
	// time lets a broken removal show.
	time.Sleep(3 * time.Second)
	ticks := tickTimes(t, st, "sched:tick:")
	if len(ticks) == 0 {
		t.Fatal("no tick job in the queue; the scheduler ran one")
	}
	limit := removed.Add(reload).Unix()
	for _, tk := range ticks {
		if tk > limit {
			t.Errorf("tick %d enqueued after the schedule was removed (at %d, reload %v): %d", tk, removed.Unix(), reload, ticks)
		}
	}
}

// tickTimes returns the tick times (unix s) of the default queue's jobs
// whose ids start with prefix (sched:NAME:), in every asynq state.
func tickTimes(t *testing.T, st *apiStack, prefix string) []int64 {
	t.Helper()
	var ticks []int64
	for _, id := range redistest.TaskIDs(t, st.rdb, jobs.DefaultQueue, prefix) {
		n, err := strconv.ParseInt(strings.TrimPrefix(id, prefix), 10, 64)
		if err != nil {
			t.Fatalf("tick job id %q: %v", id, err)
		}
		ticks = append(ticks, n)
	}
	slices.Sort(ticks)
	return ticks
}
