package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/subtle"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

// openAPI is the API's OpenAPI 3 document, served at /v1/openapi.json.
// TestRoutesMatchOpenAPI checks that it names exactly the routes served.
//
//go:embed openapi.json
var openAPI []byte

// Limits of a request.
const (
	// maxJobBytes bounds the body of one job: far above any valid job
	// (stdin is capped at 4 MiB, JSON escaping can grow it 6x).
	maxJobBytes = 32 << 20
	// maxWait bounds ?wait=.
	maxWait = 24 * time.Hour
)

// server serves the HTTP API.
type server struct {
	rdb   redis.UniversalClient
	prod  *jobs.Producer
	hub   *jobs.Hub
	pool  *sandboxpool.Pool
	token string // "" no auth (loopback only)
	// maxBatchBytes bounds a batch's body, which is read whole before the
	// first response line.
	maxBatchBytes int64
	log           *slog.Logger
}

// route is one route served; the OpenAPI document must list the same.
type route struct {
	method, path string
	public       bool // served without a token
	handle       func(*server, http.ResponseWriter, *http.Request)
}

var routes = []route{
	{"POST", "/v1/jobs", false, (*server).postJob},
	{"POST", "/v1/jobs/batch", false, (*server).postBatch},
	{"GET", "/v1/jobs/{id}", false, (*server).getJob},
	{"POST", "/v1/jobs/{id}/cancel", false, (*server).cancelJob},
	{"GET", "/v1/tasks/{task}", false, (*server).getTask},
	{"POST", "/v1/tasks/{task}/terminate", false, (*server).terminateTask},
	{"GET", "/v1/schedules", false, (*server).listSchedules},
	{"PUT", "/v1/schedules/{name}", false, (*server).putSchedule},
	{"DELETE", "/v1/schedules/{name}", false, (*server).deleteSchedule},
	{"GET", "/v1/openapi.json", true, (*server).getOpenAPI},
	{"GET", "/healthz", true, (*server).healthz},
}

func (s *server) handler() http.Handler {
	mux := http.NewServeMux()
	for _, rt := range routes {
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { rt.handle(s, w, r) })
		if rt.public {
			mux.Handle(rt.method+" "+rt.path, h)
		} else {
			mux.Handle(rt.method+" "+rt.path, s.auth(h))
		}
	}
	// Unknown routes answer in JSON like the rest. This catch-all also
	// takes a known path asked with another method (the mux prefers it to
	// its own 405): that is a 405 naming the methods the path takes.
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if allow := allowed(mux, r); allow != "" {
			w.Header().Set("Allow", allow)
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("%s %s: this route takes %s (see /v1/openapi.json)", r.Method, r.URL.Path, allow))
			return
		}
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such route: %s %s (see /v1/openapi.json)", r.Method, r.URL.Path))
	})
	return mux
}

// allowed returns the methods (an Allow header) for which mux has a route
// of r's path other than the catch-all, "" none.
func allowed(mux *http.ServeMux, r *http.Request) string {
	var allow []string
	for _, m := range []string{"GET", "POST", "PUT", "DELETE"} {
		probe := r.Clone(r.Context())
		probe.Method = m
		if _, pattern := mux.Handler(probe); pattern != "/" && pattern != "" {
			allow = append(allow, m)
			if m == "GET" {
				allow = append(allow, "HEAD") // the mux serves HEAD with GET
			}
		}
	}
	return strings.Join(allow, ", ")
}

// auth checks the bearer token, in constant time.
func (s *server) auth(next http.Handler) http.Handler {
	want := []byte("Bearer " + s.token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.token != "" && subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="boxq"`)
			writeError(w, http.StatusUnauthorized, "missing or wrong token: send Authorization: Bearer <BOXQ_API_TOKEN>")
			return
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

// fail answers an error of the producer: 404 for an unknown job or
// schedule, 503
// otherwise (Redis does not answer, or the API is shutting down; a client
// that left reads nothing, which costs nothing).
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case errors.Is(err, jobs.ErrJobNotFound), errors.Is(err, jobs.ErrNoSchedule):
		writeError(w, http.StatusNotFound, err.Error())
	case r.Context().Err() != nil:
		writeError(w, http.StatusServiceUnavailable, "the request ended before its answer (the API is shutting down, or the client left)")
	default:
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusServiceUnavailable, err.Error())
	}
}

// waitParam reads ?wait= (a Go duration, or seconds as a number); 0 when
// absent.
func waitParam(r *http.Request) (time.Duration, error) {
	v := r.URL.Query().Get("wait")
	if v == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		secs, nerr := strconv.ParseFloat(v, 64)
		if nerr != nil {
			return 0, fmt.Errorf("wait=%q: want a duration such as 30s or 2m, or seconds", v)
		}
		// Range-checked before the conversion: NaN and out-of-range
		// floats convert to whatever the CPU makes of them.
		if !(secs >= 0 && secs <= maxWait.Seconds()) {
			return 0, fmt.Errorf("wait=%q: want between 0 and %v", v, maxWait)
		}
		d = time.Duration(secs * float64(time.Second))
	}
	if d < 0 || d > maxWait {
		return 0, fmt.Errorf("wait=%q: want between 0 and %v", v, maxWait)
	}
	return d, nil
}

// readBody reads a body of at most limit bytes; tooBig is true past it.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) (b []byte, tooBig bool, err error) {
	b, err = io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return nil, true, err
	}
	return b, false, err
}

// postJob enqueues one job; with ?wait= it answers its result if the job
// ends in time.
func (s *server) postJob(w http.ResponseWriter, r *http.Request) {
	wait, err := waitParam(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	body, tooBig, err := readBody(w, r, maxJobBytes)
	switch {
	case tooBig:
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("invalid job: the body is larger than %d bytes", maxJobBytes))
		return
	case err != nil:
		writeError(w, http.StatusBadRequest, "reading the body: "+err.Error())
		return
	}
	j, err := jobs.ParseJob(body)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if j.ID == "" {
		j.ID = uuid.NewString()
	}
	var watch *jobs.Watch
	if wait > 0 {
		// Watch before enqueueing: the result cannot slip by.
		watch = s.hub.Watch()
		defer watch.Close()
		watch.Add(jobs.Enqueued{ID: j.ID, Queue: j.QueueName()})
	}
	e, err := s.prod.Enqueue(r.Context(), j, "")
	if err != nil {
		if isJobError(err) {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		s.fail(w, r, err)
		return
	}
	if wait == 0 {
		writeJSON(w, http.StatusAccepted, enqueuedJSON{ID: e.ID, Queue: e.Queue, Existed: e.Existed})
		return
	}
	if e.Existed {
		watch.Check(e.ID)
	}
	s.answer(w, r, e.ID, watch, wait)
}

// isJobError tells a job refused for what it says (a 400) from a fault.
func isJobError(err error) bool {
	return strings.HasPrefix(err.Error(), "invalid job: ")
}

type enqueuedJSON struct {
	ID      string `json:"id"`
	Queue   string `json:"queue"`
	Existed bool   `json:"existed,omitempty"`
}

// answer waits up to wait for job id's result on watch: 200 with it, or
// 202 with the job's status when the wait ends first (or the API shuts
// down: the job goes on, and the client can ask again).
func (s *server) answer(w http.ResponseWriter, r *http.Request, id string, watch *jobs.Watch, wait time.Duration) {
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	res, err := watch.Next(ctx)
	if err == nil {
		writeJSON(w, http.StatusOK, res)
		return
	}
	if ctx.Err() == nil {
		s.fail(w, r, err)
		return
	}
	sctx, scancel := context.WithTimeout(context.WithoutCancel(r.Context()), 5*time.Second)
	defer scancel()
	st, err := s.prod.Status(sctx, id)
	switch {
	case err != nil:
		s.fail(w, r, err)
	case st.Result != nil:
		writeJSON(w, http.StatusOK, st.Result)
	default:
		writeJSON(w, http.StatusAccepted, st)
	}
}

// getJob answers a job's result or status; with ?wait= it waits for the
// result first.
func (s *server) getJob(w http.ResponseWriter, r *http.Request) {
	wait, err := waitParam(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	id := r.PathValue("id")
	st, err := s.prod.Status(r.Context(), id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	switch {
	case st.Result != nil:
		writeJSON(w, http.StatusOK, st.Result)
	case wait == 0:
		writeJSON(w, http.StatusAccepted, st)
	default:
		watch := s.hub.Watch()
		defer watch.Close()
		watch.Add(jobs.Enqueued{ID: id, Queue: st.Queue})
		// It may have ended between the status and the Add.
		watch.Check(id)
		s.answer(w, r, id, watch, wait)
	}
}

func (s *server) cancelJob(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := s.prod.Cancel(r.Context(), id); err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"id": id, "status": "cancel requested"})
}

// taskJSON is what GET /v1/tasks/{task} answers.
type taskJSON struct {
	TaskID    string              `json:"task_id"`
	SandboxID string              `json:"sandbox_id,omitempty"`
	Cwd       string              `json:"cwd,omitempty"`
	CreatedAt time.Time           `json:"created_at,omitzero"`
	LastUsed  time.Time           `json:"last_used,omitzero"`
	Sequences []jobs.TaskSequence `json:"sequences"`
	// Waiting counts the task's jobs waiting for their turn, over every
	// queue.
	Waiting int64 `json:"waiting"`
}

func (s *server) getTask(w http.ResponseWriter, r *http.Request) {
	task := r.PathValue("task")
	rec, ok, err := s.pool.Get(r.Context(), task)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	seqs, err := s.prod.TaskSequences(r.Context(), task)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if !ok && len(seqs) == 0 {
		writeError(w, http.StatusNotFound, fmt.Sprintf("task %q has no sandbox and no job", task))
		return
	}
	out := taskJSON{TaskID: task, Sequences: seqs}
	if out.Sequences == nil {
		out.Sequences = []jobs.TaskSequence{}
	}
	if ok {
		out.SandboxID, out.Cwd, out.CreatedAt, out.LastUsed = rec.SandboxID, rec.Cwd, rec.CreatedAt, rec.LastUsed
	}
	for _, sq := range seqs {
		out.Waiting += sq.Waiting
	}
	writeJSON(w, http.StatusOK, out)
}

// terminateTask ends a task's sandbox (?if_idle=true: only when nothing
// runs or waits). With ?wait= it answers what the worker did.
func (s *server) terminateTask(w http.ResponseWriter, r *http.Request) {
	wait, err := waitParam(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	ifIdle, err := boolParam(r, "if_idle")
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	task := r.PathValue("task")
	if task == "" {
		writeError(w, http.StatusBadRequest, "invalid job: task_id is required")
		return
	}
	id, err := s.prod.Terminate(r.Context(), task, ifIdle)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	accepted := map[string]string{"task_id": task, "terminate_job": id, "status": "terminate requested"}
	if wait == 0 {
		writeJSON(w, http.StatusAccepted, accepted)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	out, err := s.prod.WaitTerminate(ctx, id)
	switch {
	case errors.Is(err, context.DeadlineExceeded) && r.Context().Err() == nil:
		writeJSON(w, http.StatusAccepted, accepted)
	case err != nil:
		s.fail(w, r, err)
	default:
		writeJSON(w, http.StatusOK, out)
	}
}

// maxScheduleBytes bounds a schedule's body: a job's, and a few fields.
const maxScheduleBytes = maxJobBytes + 64<<10

// listSchedules answers what enqueue -schedules shows: every schedule,
// by name, with its next tick, its last run and that run's results.
func (s *server) listSchedules(w http.ResponseWriter, r *http.Request) {
	sts, err := s.prod.Schedules(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string][]jobs.ScheduleStatus{"schedules": sts})
}

// putSchedule adds or replaces a schedule, as enqueue -schedule does: the
// body is the schedule's JSON (jobs.Schedule), its name the path's. It
// answers 200 with the schedule as stored; workers take it up within one
// reap tick.
func (s *server) putSchedule(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	body, tooBig, err := readBody(w, r, maxScheduleBytes)
	switch {
	case tooBig:
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("invalid schedule: the body is larger than %d bytes", maxScheduleBytes))
		return
	case err != nil:
		writeError(w, http.StatusBadRequest, "reading the body: "+err.Error())
		return
	}
	sc, err := jobs.ParseSchedule(name, body)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	// The answer is what this PUT stored, not a read-back: another
	// client's PUT or DELETE in between is theirs to report.
	st, err := s.prod.PutSchedule(r.Context(), sc)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// deleteSchedule removes a schedule, as enqueue -unschedule does: 204,
// or 404 for a name not set. Jobs its ticks enqueued are left as they are.
func (s *server) deleteSchedule(w http.ResponseWriter, r *http.Request) {
	if err := s.prod.Unschedule(r.Context(), r.PathValue("name")); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func boolParam(r *http.Request, name string) (bool, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("%s=%q: want true or false", name, v)
	}
	return b, nil
}

func (s *server) getOpenAPI(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(openAPI)
}

func (s *server) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := s.rdb.Ping(ctx).Err(); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "unhealthy", "error": "redis: " + err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// Lines of a batch's response.
type (
	batchAccepted struct {
		Line    int    `json:"line"`
		ID      string `json:"id"`
		Existed bool   `json:"existed,omitempty"`
	}
	batchRefused struct {
		Line  int    `json:"line"`
		ID    string `json:"id,omitempty"`
		Error string `json:"error"`
	}
	batchResult struct {
		Line   int          `json:"line"`
		Result *jobs.Result `json:"result"`
	}
	batchSummary struct {
		Summary summary `json:"summary"`
	}
	summary struct {
		Lines    int            `json:"lines"`
		Enqueued int            `json:"enqueued"`
		Invalid  int            `json:"invalid"`
		Results  int            `json:"results"`
		ByStatus map[string]int `json:"by_status"`
		// Pending counts the jobs with no result when the wait ended.
		Pending int `json:"pending"`
	}
)

// postBatch enqueues a JSONL batch, answering one NDJSON line per input
// line; with ?wait= it then streams each result as it finishes and ends
// with a summary. The whole body is read before the first line is
// written: simple clients send, then read, and would deadlock on a server
// that answered while they still send. Results are not gathered: each is
// read from Redis when its job ends and written out, so a batch of
// 100,000 jobs holds their ids, not their results.
func (s *server) postBatch(w http.ResponseWriter, r *http.Request) {
	wait, err := waitParam(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	body, tooBig, err := readBody(w, r, s.maxBatchBytes)
	switch {
	case tooBig:
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("the batch is larger than %d bytes (-max-batch-bytes): split it", s.maxBatchBytes))
		return
	case err != nil:
		writeError(w, http.StatusBadRequest, "reading the body: "+err.Error())
		return
	}
	ctx := r.Context()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	out := bufio.NewWriterSize(w, 32<<10)
	enc := json.NewEncoder(out)
	flusher := http.NewResponseController(w)
	flush := func() error {
		if err := out.Flush(); err != nil {
			return err
		}
		return flusher.Flush()
	}

	var watch *jobs.Watch
	if wait > 0 {
		watch = s.hub.Watch()
		defer watch.Close()
	}
	var (
		sum    = summary{ByStatus: map[string]int{}}
		lineOf = map[string]int{} // job id → line: for the result lines, and duplicates
	)
	for len(body) > 0 {
		var line []byte
		line, body, _ = bytes.Cut(body, []byte("\n"))
		sum.Lines++
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		j, perr := jobs.ParseJob(line)
		if perr == nil {
			if j.ID == "" {
				j.ID = uuid.NewString()
			}
			if first, dup := lineOf[j.ID]; dup {
				perr = fmt.Errorf("invalid job: id %q repeats line %d: one id is one job", j.ID, first)
			}
		}
		var (
			e     jobs.Enqueued
			added bool // j is in watch: a refused duplicate is not, its first line is
		)
		if perr == nil {
			if watch != nil {
				watch.Add(jobs.Enqueued{ID: j.ID, Queue: j.QueueName()})
				added = true
			}
			e, perr = s.prod.Enqueue(ctx, j, "")
			if perr != nil && ctx.Err() != nil {
				return
			}
		}
		if perr != nil {
			sum.Invalid++
			if added {
				watch.Remove(j.ID)
			}
			if err := enc.Encode(batchRefused{Line: sum.Lines, ID: j.ID, Error: perr.Error()}); err != nil {
				return
			}
			continue
		}
		sum.Enqueued++
		lineOf[e.ID] = sum.Lines
		if e.Existed && watch != nil {
			watch.Check(e.ID)
		}
		if err := enc.Encode(batchAccepted{Line: sum.Lines, ID: e.ID, Existed: e.Existed}); err != nil {
			return
		}
	}
	body = nil
	if err := flush(); err != nil || watch == nil {
		return
	}

	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for watch.Pending() > 0 {
		res, err := watch.Next(wctx)
		if err != nil {
			if ctx.Err() != nil {
				return // the client left
			}
			if !errors.Is(err, context.DeadlineExceeded) {
				s.log.Error("batch wait failed", "err", err)
			}
			break
		}
		sum.Results++
		sum.ByStatus[res.Status]++
		if err := enc.Encode(batchResult{Line: lineOf[res.ID], Result: &res}); err != nil {
			return
		}
		// Flush when nothing else is ready, so that a client sees each
		// result as it finishes without a write per line under load.
		if out.Buffered() > 16<<10 || watch.Pending() == 0 || !watch.Ready() {
			if err := flush(); err != nil {
				return
			}
		}
	}
	sum.Pending = watch.Pending()
	_ = enc.Encode(batchSummary{Summary: sum})
	_ = flush()
}
