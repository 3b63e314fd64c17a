package jobs_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"

	"github.com/boxq/boxq/jobs"
)

// FuzzParseJob feeds ParseJob any bytes. It must never panic; a job it
// accepts must be one valid JSON object that passes Validate, survives a
// round trip unchanged and has a usable timeout; a job it rejects must get
// a short message, in words a user can act on, that starts with
// "invalid job".
func FuzzParseJob(f *testing.F) {
	for _, s := range []string{
		`{"task_id":"t","command":"echo hi"}`,
		`{"id":"j1","task_id":"t","command":"ls","cwd":"/tmp","timeout_s":2.5,"stdin":"x","image":"alpine","cpu":2,"memory_mib":512,"disk_mib":1024,"persistent":false,"queue":"q"}`,
		`{"task_id":"t","command":"x","timeout_s":0}`,
		`{"task_id":"t","command":"x","timeout_s":-1}`,
		`{"task_id":"t","command":"x","timeout_s":1e-9}`,
		`{"task_id":"t","command":"x","timeout_s":1e300}`,
		`{"task_id":"t","command":"x","timeout_s":"10"}`,
		`{"task_id":"t","command":42}`,
		`{"task_id":"t","command":"x","timeout":5}`,
		`{"task_id":"t","command":"x"}}`,
		`{"task_id":"t","command":"x"} {}`,
		`[{"task_id":"t","command":"x"}]`,
		`"just a string"`,
		`null`,
		`{}`,
		``,
		`{"task_id":"t","command":"x`,
		"{\"task_id\":\"\xff\",\"command\":\"x\"}",
		"{\"task_id\":\"t\",\"command\":\"echo \xc3\x28\"}",
		`{"task_id":"a\u0000b","command":"x"}`,
		`{"task_id":"t","command":"x","queue":"a:b"}`,
		`{"task_id":"t","command":"x","memory_mib":1e99}`,
		`{"task_id":"t","command":"x","persistent":"yes"}`,
		`{"TASK_ID":"t","Command":"x"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		j, err := jobs.ParseJob(line)
		if err != nil {
			checkRejection(t, line, err)
			return
		}
		trimmed := bytes.TrimSpace(line)
		if !json.Valid(line) || len(trimmed) == 0 || trimmed[0] != '{' {
			t.Fatalf("ParseJob accepted %q, which is not one JSON object", line)
		}
		if !utf8.Valid(line) {
			t.Fatalf("ParseJob accepted %q, which is not UTF-8", line)
		}
		if err := j.Validate(); err != nil {
			t.Fatalf("ParseJob accepted %q, which Validate rejects: %v", line, err)
		}
		if d := j.Timeout(); d < time.Millisecond || d > jobs.MaxTimeout {
			t.Fatalf("ParseJob accepted %q with timeout %v: want 1ms..%v", line, d, jobs.MaxTimeout)
		}
		again, err := json.Marshal(j)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", j, err)
		}
		j2, err := jobs.ParseJob(again)
		if err != nil {
			t.Fatalf("ParseJob rejects its own job %s: %v", again, err)
		}
		if diff := cmp.Diff(j2, j); diff != "" {
			t.Fatalf("round trip of %q changed the job (-got +want):\n%s", line, diff)
		}
	})
}

// checkRejection checks the message of a rejected job.
func checkRejection(t *testing.T, line []byte, err error) {
	t.Helper()
	msg := err.Error()
	switch {
	case !strings.HasPrefix(msg, "invalid job: "):
		t.Fatalf("rejection of %q: %q does not start with %q", line, msg, "invalid job: ")
	case len(msg) > 400:
		t.Fatalf("rejection of a %d-byte line is %d bytes long: %.200q…", len(line), len(msg), msg)
	case !utf8.ValidString(msg):
		t.Fatalf("rejection of %q is not UTF-8: %q", line, msg)
	}
	// Go's names for things are not a user's.
	for _, jargon := range []string{"jobs.", "Job.", "float64", "*float", "*bool", "json: cannot unmarshal", "Go value", "map[", "<nil>"} {
		if strings.Contains(msg, jargon) {
			t.Fatalf("rejection of %q speaks Go (%q): %s", line, jargon, msg)
		}
	}
}

// TestParseJobMessages pins the messages of the common mistakes.
func TestParseJobMessages(t *testing.T) {
	tests := []struct {
		line, want string
	}{
		{`{"task_id":"t","command":42}`, `field "command" must be a string, not a number`},
		{`{"task_id":"t","command":"x","timeout_s":"10"}`, `field "timeout_s" must be a number, not a string`},
		{`{"task_id":"t","command":"x","persistent":"yes"}`, `field "persistent" must be true or false, not a string`},
		{`{"task_id":"t","command":"x","timeout":5}`, `unknown field "timeout"`},
		{`{"task_id":"t","command":"x","timeout_s":0}`, `timeout_s must be a positive number of seconds`},
		{`{"task_id":"t","command":"x","timeout_s":-1}`, `timeout_s must be a positive number of seconds`},
		{`{"task_id":"t","command":"x","timeout_s":1e-9}`, `timeout_s must be at least 0.001`},
		{`[{"task_id":"t","command":"x"}]`, `a job is a JSON object`},
		{`null`, `a job is a JSON object`},
		{`{"task_id":"t","command":"x"}}`, `more than one JSON value`},
		{`{"task_id":"t","command":"x`, `the line ends inside a JSON value`},
		{"{\"task_id\":\"t\",\"command\":\"echo \xff\"}", `not valid UTF-8`},
		{`{"task_id":"t"}`, `command is required`},
		{`{"command":"x"}`, `task_id is required`},
		{`{"task_id":"t","Command":"x"}`, `field "Command" is spelled "command"`},
		{`{"TASK_ID":"t","command":"x"}`, `field "TASK_ID" is spelled "task_id"`},
		{`{"task_id":"t","command":"ls","command":"rm -rf ~"}`, `field "command" is given twice`},
		{`{"task_id":"t","command":"ls","cwd":"/a","CWD":"/b"}`, `field "CWD" is spelled "cwd"`},
	}
	for _, tt := range tests {
		t.Run(tt.line, func(t *testing.T) {
			_, err := jobs.ParseJob([]byte(tt.line))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("ParseJob(%q) = %v, want an error containing %q", tt.line, err, tt.want)
			}
			checkRejection(t, []byte(tt.line), err)
		})
	}
	long := `{"task_id":"t","command":"x","queue":"` + strings.Repeat("q:", 1<<20) + `"}`
	_, err := jobs.ParseJob([]byte(long))
	if err == nil {
		t.Fatal("ParseJob accepted a queue name with colons")
	}
	checkRejection(t, []byte(long), err)
}
