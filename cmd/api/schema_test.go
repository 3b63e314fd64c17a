package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/jobs"
)

// fitSchema checks v (decoded JSON) against schema, in the parts of JSON
// Schema the OpenAPI document uses for objects: $ref, allOf (each part
// applies to the whole value, as a validator reads it), type object with
// properties, required and additionalProperties: false, and arrays'
// items. It returns where v does not fit, "" when it does.
func fitSchema(doc map[string]any, schema map[string]any, v any, at string) string {
	if ref, ok := schema["$ref"].(string); ok {
		name := strings.TrimPrefix(ref, "#/components/schemas/")
		s, _ := doc["components"].(map[string]any)["schemas"].(map[string]any)[name].(map[string]any)
		if s == nil {
			return fmt.Sprintf("%s: unknown $ref %s", at, ref)
		}
		return fitSchema(doc, s, v, at)
	}
	for i, part := range asSlice(schema["allOf"]) {
		if msg := fitSchema(doc, part.(map[string]any), v, fmt.Sprintf("%s(allOf[%d])", at, i)); msg != "" {
			return msg
		}
	}
	switch v := v.(type) {
	case map[string]any:
		props, _ := schema["properties"].(map[string]any)
		for _, r := range asSlice(schema["required"]) {
			if _, ok := v[r.(string)]; !ok {
				return fmt.Sprintf("%s: required field %q missing", at, r)
			}
		}
		for k, fv := range v {
			ps, ok := props[k].(map[string]any)
			if !ok {
				if schema["additionalProperties"] == false {
					return fmt.Sprintf("%s: field %q is not allowed (additionalProperties: false)", at, k)
				}
				continue
			}
			if msg := fitSchema(doc, ps, fv, at+"."+k); msg != "" {
				return msg
			}
		}
	case []any:
		if items, ok := schema["items"].(map[string]any); ok {
			for i, e := range v {
				if msg := fitSchema(doc, items, e, fmt.Sprintf("%s[%d]", at, i)); msg != "" {
					return msg
				}
			}
		}
	}
	return ""
}

func asSlice(v any) []any { s, _ := v.([]any); return s }

// TestScheduleAnswersFitOpenAPI: what PUT and GET /v1/schedules answer
// fits the schemas the OpenAPI document gives for their 200, as a client
// or a validator generated from the document reads them.
func TestScheduleAnswersFitOpenAPI(t *testing.T) {
	var doc map[string]any
	if err := json.Unmarshal(openAPI, &doc); err != nil {
		t.Fatal(err)
	}
	schemaOf := func(path, method string) map[string]any {
		op := doc["paths"].(map[string]any)[path].(map[string]any)[method].(map[string]any)
		ok := op["responses"].(map[string]any)["200"].(map[string]any)
		return ok["content"].(map[string]any)["application/json"].(map[string]any)["schema"].(map[string]any)
	}
	st := newAPIStack(t, "")
	c := http.DefaultClient
	for _, body := range []string{
		`{"cron":"@daily","tz":"Europe/Paris","task":"t","job":{"command":"true","timeout_s":5,"queue":"q"}}`,
		`{"cron":"0 3 * * *","tasks":"eval-*","terminate":true,"if_idle":true}`,
	} {
		var got map[string]any
		if code := do(t, c, "PUT", st.url+"/v1/schedules/s", "", body, &got); code != http.StatusOK {
			t.Fatalf("PUT %s: %d %v", body, code, got)
		}
		if msg := fitSchema(doc, schemaOf("/v1/schedules/{name}", "put"), got, "PUT answer"); msg != "" {
			t.Errorf("PUT %s answers %v\n  which does not fit the document: %s", body, got, msg)
		}
		var list map[string]any
		if code := do(t, c, "GET", st.url+"/v1/schedules", "", "", &list); code != http.StatusOK {
			t.Fatalf("GET: %d %v", code, list)
		}
		if msg := fitSchema(doc, schemaOf("/v1/schedules", "get"), list, "GET answer"); msg != "" {
			t.Errorf("GET answers %v\n  which does not fit the document: %s", list, msg)
		}
	}
}

// afterHSet runs then once, right after the API's first HSET of the
// schedules hash: another client's change lands between the PUT's store
// and its answer.
type afterHSet struct {
	once *sync.Once
	then func()
}

func (h afterHSet) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h afterHSet) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h afterHSet) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if args := cmd.Args(); cmd.Name() == "hset" && len(args) > 1 && strings.HasSuffix(fmt.Sprint(args[1]), "schedules") {
			h.once.Do(h.then)
		}
		return err
	}
}

// TestPutScheduleAnswersWhatItStored: PUT answers 200 with the schedule
// it stored, even when another client removes or replaces it before the
// answer is written (it used to read the schedule back: a 404 "no such
// schedule" for a PUT that succeeded, or the other client's schedule).
func TestPutScheduleAnswersWhatItStored(t *testing.T) {
	for _, race := range []string{"DELETE", "PUT"} {
		t.Run(race, func(t *testing.T) {
			st := newAPIStack(t, "")
			otherRDB := redis.NewClient(mustParseURL(t, st.redisURL))
			t.Cleanup(func() { otherRDB.Close() })
			other, err := jobs.NewProducer(otherRDB, jobs.ProducerConfig{})
			if err != nil {
				t.Fatal(err)
			}
			st.rdb.AddHook(afterHSet{once: new(sync.Once), then: func() {
				ctx := context.Background()
				if race == "DELETE" {
					err = other.Unschedule(ctx, "s")
				} else {
					err = other.SetSchedule(ctx, jobs.Schedule{Name: "s", Cron: "@hourly", Task: "other", Job: &jobs.Job{Command: "false"}})
				}
			}})
			var got jobs.ScheduleStatus
			code := do(t, http.DefaultClient, "PUT", st.url+"/v1/schedules/s", "", `{"cron":"@daily","task":"mine","job":{"command":"true"}}`, &got)
			if err != nil {
				t.Fatalf("the other client's %s: %v", race, err)
			}
			if code != http.StatusOK || got.Name != "s" || got.Cron != "@daily" || got.Task != "mine" || got.Job == nil || got.Job.Command != "true" || got.UpdatedAt.IsZero() {
				t.Errorf("PUT with a %s in between: %d %+v; want 200 with the schedule this PUT stored", race, code, got)
			}
		})
	}
}

func mustParseURL(t *testing.T, url string) *redis.Options {
	t.Helper()
	o, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// TestReplacedScheduleHasNoLastRun: a schedule replaced by a PUT has no
// last run until a tick of its own runs, as the document says ("the last
// tick run since the schedule was set; absent before the first"): the
// PUT's answer and the list used to show the replaced schedule's run, and
// its results, as the new one's.
func TestReplacedScheduleHasNoLastRun(t *testing.T) {
	st := newAPIStack(t, "")
	st.startWorkerEvery(t, 300*time.Millisecond)
	c := http.DefaultClient
	var got jobs.ScheduleStatus
	if code := do(t, c, "PUT", st.url+"/v1/schedules/r", "", `{"cron":"@every 1s","task":"r","job":{"command":"true"}}`, &got); code != http.StatusOK {
		t.Fatalf("PUT: %d %+v", code, got)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		var list schedulesJSON
		if code := do(t, c, "GET", st.url+"/v1/schedules", "", "", &list); code != http.StatusOK || len(list.Schedules) != 1 {
			t.Fatalf("GET: %d %+v", code, list)
		}
		if list.Schedules[0].Last != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no tick of @every 1s within 60s")
		}
		time.Sleep(50 * time.Millisecond) // observing another party: the worker's scheduler
	}
	if code := do(t, c, "PUT", st.url+"/v1/schedules/r", "", `{"cron":"@daily","task":"r","job":{"command":"false"}}`, &got); code != http.StatusOK || got.Last != nil || got.Results != nil {
		t.Errorf("PUT replacing it: %d last %+v results %v; want 200 and no last run", code, got.Last, got.Results)
	}
	var list schedulesJSON
	if code := do(t, c, "GET", st.url+"/v1/schedules", "", "", &list); code != http.StatusOK || len(list.Schedules) != 1 || list.Schedules[0].Last != nil {
		t.Errorf("GET after the replace: %d %+v; want the schedule with no last run", code, list)
	}
}
