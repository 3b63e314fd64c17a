package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/jobs"
)

func noenv(string) string { return "" }

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"nothing", nil, "missing -task"},
		{"no command", []string{"-task", "t"}, "missing command"},
		{"two modes", []string{"-f", "x", "-cancel", "y"}, "different modes"},
		{"terminate without task", []string{"-terminate"}, "-terminate needs -task"},
		{"bad timeout", []string{"-task", "t", "-timeout", "-1s", "--", "true"}, "-timeout must be positive"},
		{"unknown flag", []string{"-nope"}, "flag provided but not defined"},
		{"json with batch", []string{"-f", "x", "-json"}, "-json is for one job"},
		{"id with batch", []string{"-f", "x", "-id", "j"}, "drop -id"},
		{"stdin-file with batch", []string{"-f", "x", "-stdin-file", "in"}, "drop -stdin-file"},
		{"timeout without unit", []string{"-task", "t", "-timeout", "5", "--", "true"}, "5s"},
		{"timeout beyond the maximum", []string{"-task", "t", "-timeout", "2h", "--", "true"}, "maximum, 1h0m0s"},
		{"missing stdin file", []string{"-task", "t", "-stdin-file", "/nonexistent/in", "--", "cat"}, "-stdin-file"},
		{"cancel with wait", []string{"-cancel", "j", "-wait"}, "-cancel does not wait"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			err := run(context.Background(), tt.args, noenv, strings.NewReader(""), &out, &errb)
			var ue *app.UsageError
			if !errors.As(err, &ue) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("run(%q) = %v, want a usage error containing %q", tt.args, err, tt.want)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), []string{"-h"}, noenv, nil, &out, &out)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("run -h = %v, want flag.ErrHelp", err)
	}
	for _, want := range []string{"enqueue —", "-task", "REDIS_URL", "Examples:", "-dev"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("help lacks %q", want)
		}
	}
}

func TestDevBatch(t *testing.T) {
	dir := t.TempDir()
	batch := filepath.Join(dir, "batch.jsonl")
	lines := `{"id": "a", "task_id": "t1", "command": "cd /tmp && echo hi"}
{"id": "b", "task_id": "t2", "command": "exit 3"}
this is not json

{"id": "c", "task_id": "t3", "command": "cat", "stdin": "in\n"}
{"id": "d", "task_id": "t4", "command": "sleep 10", "timeout_s": 0.5}
`
	if err := os.WriteFile(batch, []byte(lines), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := run(ctx, []string{"-dev", "-f", batch, "-wait"}, noenv, nil, &out, &errb)
	var ee *app.ExitError
	if !errors.As(err, &ee) || ee.Code != 1 {
		t.Fatalf("run = %v, want exit 1 (one invalid line); stderr:\n%s", err, errb.String())
	}
	if !strings.Contains(errb.String(), "line 3:") {
		t.Errorf("stderr does not report line 3: %s", errb.String())
	}
	got := map[string]jobs.Result{}
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var r jobs.Result
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("result line %q: %v", l, err)
		}
		got[r.ID] = r
	}
	if len(got) != 5 {
		t.Fatalf("%d result lines, want 5 (4 jobs + the invalid line):\n%s", len(got), out.String())
	}
	checks := []struct {
		id, status string
		rc         int
		output     string
	}{
		{"a", jobs.StatusCompleted, 0, "hi\n"},
		{"b", jobs.StatusCompleted, 3, ""},
		{"c", jobs.StatusCompleted, 0, "in\n"},
		{"d", jobs.StatusTimeout, 124, ""},
	}
	for _, c := range checks {
		r := got[c.id]
		if r.Status != c.status || r.ReturnCode != c.rc || r.Output != c.output {
			t.Errorf("job %s: %s/%d %q, want %s/%d %q", c.id, r.Status, r.ReturnCode, r.Output, c.status, c.rc, c.output)
		}
	}
	if got["a"].Cwd != "/tmp" {
		t.Errorf("job a cwd = %q, want /tmp", got["a"].Cwd)
	}
	if bad := got["invalid-line-3"]; bad.Status != jobs.StatusError || !strings.Contains(bad.Error, "line 3") || bad.FinishedAt.IsZero() {
		t.Errorf("invalid line result = %+v; want id invalid-line-3, status error, a finish time", bad)
	}
	// The closing summary, on stderr: counts by status and return code,
	// durations.
	for _, want := range []string{"5 results in", "completed 3 (1 rc≠0)", "timeout 1", "error 1", "rc 0 ×2", "rc 3 ×1", "rc 124 ×1", "p50", "p90"} {
		if !strings.Contains(errb.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, errb.String())
		}
	}
}

func TestDevOneJobExitCode(t *testing.T) {
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := run(ctx, []string{"-dev", "-task", "x", "--", "echo", "out;", "exit", "7"}, noenv, nil, &out, &errb)
	var ee *app.ExitError
	if !errors.As(err, &ee) || ee.Code != 7 {
		t.Fatalf("run = %v, want exit 7; stderr %s", err, errb.String())
	}
	if out.String() != "out\n" {
		t.Errorf("stdout %q, want %q", out.String(), "out\n")
	}
}
