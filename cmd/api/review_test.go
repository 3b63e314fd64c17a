package main

import (
	"bufio"
	"encoding/json"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/jobs"
)

// TestAPIBatchDuplicateIDKeepsFirstResult: a batch whose second line
// repeats the first line's id refuses the second line, and still streams
// the first job's result (the refusal must not stop the wait for the job
// the id already names).
func TestAPIBatchDuplicateIDKeepsFirstResult(t *testing.T) {
	st := newAPIStack(t, "")
	st.startWorker(t)
	body := `{"id":"dup-1","task_id":"t-dup","command":"echo one"}` + "\n" +
		`{"id":"dup-1","task_id":"t-dup","command":"echo two"}` + "\n"
	resp, err := http.Post(st.url+"/v1/jobs/batch?wait=60s", "application/x-ndjson", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var (
		results []batchResult
		refused []batchRefused
		sum     *summary
	)
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var d struct {
			batchResult
			Error   string   `json:"error"`
			Summary *summary `json:"summary"`
		}
		if err := json.Unmarshal(sc.Bytes(), &d); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		switch {
		case d.Summary != nil:
			sum = d.Summary
		case d.Error != "":
			refused = append(refused, batchRefused{Line: d.Line, Error: d.Error})
		case d.Result != nil:
			results = append(results, d.batchResult)
		}
	}
	if len(refused) != 1 || refused[0].Line != 2 {
		t.Errorf("refused lines: %+v; want line 2 only", refused)
	}
	if len(results) != 1 || results[0].Line != 1 || results[0].Result.Output != "one\n" {
		t.Errorf("result lines: %+v; want line 1's result (output \"one\\n\")", results)
	}
	if sum == nil || sum.Results != 1 || sum.Pending != 0 {
		t.Errorf("summary: %+v; want 1 result, 0 pending", sum)
	}
}

// TestOpenAPISchemasMatchTypes: each schema of the OpenAPI document lists
// exactly the JSON fields of the Go type the API reads or writes for it,
// so that a client generated from the document can send every field the
// API takes (Job has additionalProperties: false) and read every field
// it answers.
func TestOpenAPISchemasMatchTypes(t *testing.T) {
	var doc struct {
		Components struct {
			Schemas map[string]struct {
				Properties map[string]json.RawMessage `json:"properties"`
			} `json:"schemas"`
		} `json:"components"`
	}
	if err := json.Unmarshal(openAPI, &doc); err != nil {
		t.Fatal(err)
	}
	for name, typ := range map[string]reflect.Type{
		"Job":              reflect.TypeFor[jobs.Job](),
		"Result":           reflect.TypeFor[jobs.Result](),
		"JobStatus":        reflect.TypeFor[jobs.JobStatus](),
		"Enqueued":         reflect.TypeFor[enqueuedJSON](),
		"Task":             reflect.TypeFor[taskJSON](),
		"TerminateOutcome": reflect.TypeFor[jobs.TerminateOutcome](),
		"Schedule":         reflect.TypeFor[jobs.Schedule](),
		"ScheduleStatus":   reflect.TypeFor[jobs.ScheduleStatus](),
	} {
		var fields []string
		for _, f := range reflect.VisibleFields(typ) {
			if f.Anonymous {
				continue // its fields are listed with the others
			}
			tag, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			// A status with a result is answered as the result (200),
			// never as a JobStatus.
			if tag != "" && tag != "-" && !(name == "JobStatus" && tag == "result") {
				fields = append(fields, tag)
			}
		}
		documented := slices.Collect(maps.Keys(doc.Components.Schemas[name].Properties))
		slices.Sort(fields)
		slices.Sort(documented)
		if !slices.Equal(fields, documented) {
			t.Errorf("schema %s lists %q; the API's %v has %q", name, documented, typ, fields)
		}
	}
}

// TestRouteWrongMethodIs405: a served path asked with another method is
// 405 with an Allow header naming the methods it takes, not a 404 that
// says the route does not exist; an unknown path stays 404.
func TestRouteWrongMethodIs405(t *testing.T) {
	h := httptest.NewServer((&server{}).handler())
	defer h.Close()
	for _, c := range []struct{ method, path, allow string }{
		{"POST", "/v1/jobs/j1", "GET, HEAD"},
		{"DELETE", "/v1/jobs/j1", "GET, HEAD"},
		{"GET", "/v1/jobs", "POST"},
		{"PUT", "/v1/jobs/j1/cancel", "POST"},
		{"POST", "/healthz", "GET, HEAD"},
	} {
		req, _ := http.NewRequest(c.method, h.URL+c.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var e struct{ Error string }
		_ = json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != c.allow || e.Error == "" {
			t.Errorf("%s %s: %d Allow %q %q; want 405 Allow %q with an error", c.method, c.path, resp.StatusCode, resp.Header.Get("Allow"), e.Error, c.allow)
		}
	}
	resp, err := http.Get(h.URL + "/v2/nothing")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /v2/nothing: %d; want 404", resp.StatusCode)
	}
}

// TestAPIRedisDownIsDocumented: with Redis gone, each /v1 route answers
// 503 with an error, and the OpenAPI document lists that answer for it.
func TestAPIRedisDownIsDocumented(t *testing.T) {
	st := newAPIStack(t, "")
	var doc struct {
		Paths map[string]map[string]struct {
			Responses map[string]json.RawMessage `json:"responses"`
		} `json:"paths"`
	}
	if err := json.Unmarshal(openAPI, &doc); err != nil {
		t.Fatal(err)
	}
	st.rdb.Close()
	for _, rt := range routes {
		if rt.public {
			continue
		}
		path := strings.NewReplacer("{id}", "j-down", "{task}", "t-down", "{name}", "s-down").Replace(rt.path)
		body := ""
		switch rt.method {
		case "POST":
			body = `{"task_id":"t-down","command":"true"}`
		case "PUT":
			body = `{"cron":"@daily","task":"t-down","job":{"command":"true"}}`
		}
		// A batch has begun its 200 before it enqueues: each line it
		// could not enqueue says why.
		want := http.StatusServiceUnavailable
		if rt.path == "/v1/jobs/batch" {
			want = http.StatusOK
		}
		var e struct{ Error string }
		code := do(t, http.DefaultClient, rt.method, st.url+path, "", body, &e)
		if code != want || e.Error == "" {
			t.Errorf("%s %s with Redis down: %d %q; want %d with an error", rt.method, path, code, e.Error, want)
		}
		if _, ok := doc.Paths[rt.path][strings.ToLower(rt.method)].Responses[strconv.Itoa(code)]; !ok {
			t.Errorf("%s %s answers %d; the OpenAPI document does not list it", rt.method, rt.path, code)
		}
	}
}

// TestWaitParamRefusesNonNumbers: ?wait= takes a duration or seconds in
// range; NaN, infinities and out-of-range numbers are refused before any
// float-to-duration conversion (whose result differs by CPU).
func TestWaitParamRefusesNonNumbers(t *testing.T) {
	for v, want := range map[string]time.Duration{"": 0, "30s": 30 * time.Second, "1.5": 1500 * time.Millisecond, "250ms": 250 * time.Millisecond} {
		r := httptest.NewRequest("GET", "/v1/jobs/x?wait="+url.QueryEscape(v), nil)
		if d, err := waitParam(r); err != nil || d != want {
			t.Errorf("wait=%q: %v, %v; want %v", v, d, err, want)
		}
	}
	for _, v := range []string{"NaN", "nan", "Inf", "-Inf", "1e300", "-1", "-0.5", "abc", "90000"} {
		r := httptest.NewRequest("GET", "/v1/jobs/x?wait="+url.QueryEscape(v), nil)
		if d, err := waitParam(r); err == nil {
			t.Errorf("wait=%q accepted as %v; want an error", v, d)
		}
	}
}
