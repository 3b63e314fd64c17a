package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/internal/app"
)

// TestScheduleJobFileTakesFlags: a schedule's job file (-schedule -f) is
// one line of a batch: -cwd, -timeout, -queue, -image and -persistent,
// given, fill the fields it lacks (its own win), and -stdin-file, which
// it would silently ignore, is refused.
func TestScheduleJobFileTakesFlags(t *testing.T) {
	file := filepath.Join(t.TempDir(), "job.json")
	if err := os.WriteFile(file, []byte(`{"command":"make","queue":"own"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	o := options{file: file, cwd: "/src", timeout: 5 * time.Minute, queue: "batch", image: "alpine", persist: false,
		set: map[string]bool{"f": true, "cwd": true, "timeout": true, "queue": true, "image": true, "persistent": true}}
	j, err := template(&o, strings.NewReader(""))
	if err != nil {
		t.Fatal(err)
	}
	if j.Cwd != "/src" || j.TimeoutS == nil || *j.TimeoutS != 300 || j.Image != "alpine" || j.Persistent == nil || *j.Persistent {
		t.Errorf("job %+v: want the flags' cwd, timeout, image and persistent", j)
	}
	if j.Queue != "own" {
		t.Errorf("queue %q: the file's own queue must win over -queue", j.Queue)
	}

	var out, errb bytes.Buffer
	args := []string{"-redis", "redis://127.0.0.1:1/0", "-schedule", "x", "-cron", "@daily", "-task", "t", "-f", file, "-stdin-file", file}
	err = run(context.Background(), args, noenv, strings.NewReader(""), &out, &errb)
	var ue *app.UsageError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "stdin-file") {
		t.Errorf("run(%q) = %v, want a usage error about -stdin-file", args, err)
	}
}

// redisLogRecorder records go-redis's own log lines.
type redisLogRecorder struct {
	mu    sync.Mutex
	lines []string
}

func (r *redisLogRecorder) Printf(_ context.Context, format string, v ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines = append(r.lines, fmt.Sprintf(format, v...))
}

// TestSchedulingRedisDownNoRawLogs: with Redis down, the scheduling modes
// (-schedules here) say so in one message, without go-redis's raw
// "pool.go" lines before it: those go through enqueue's logger.
func TestSchedulingRedisDownNoRawLogs(t *testing.T) {
	rec := &redisLogRecorder{}
	redis.SetLogger(rec) // stands for go-redis's default logger, which writes to stderr
	var out, errb bytes.Buffer
	err := run(context.Background(), []string{"-redis", "redis://127.0.0.1:1/0", "-schedules"}, noenv, strings.NewReader(""), &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "cannot reach Redis") {
		t.Errorf("err %v, want cannot reach Redis", err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.lines) > 0 {
		t.Errorf("go-redis's raw log lines were not routed through enqueue's logger: %q", rec.lines)
	}
}

// TestSchedulingMissingStdinFileIsUsage: a missing -stdin-file is a usage
// error (exit 2) in a schedule or a fan-out too, as for one job.
func TestSchedulingMissingStdinFileIsUsage(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope")
	var out, errb bytes.Buffer
	args := []string{"-redis", "redis://127.0.0.1:1/0", "-schedule", "x", "-cron", "@daily", "-task", "t", "-stdin-file", missing, "--", "cat"}
	err := run(context.Background(), args, noenv, strings.NewReader(""), &out, &errb)
	var ue *app.UsageError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "-stdin-file") {
		t.Errorf("run(%q) = %v, want a usage error about -stdin-file", args, err)
	}
}

// TestFanOutAndScheduleRefuseIDAndO: -id names one job and -o is a
// batch's output file; a fan-out (-tasks, -tasks-file) enqueues a job per
// task and a schedule one per tick, so both refuse them with a usage error
// that names the flag, before reaching Redis (none listens at the URL:
// without the refusal the error would be "cannot reach Redis").
func TestFanOutAndScheduleRefuseIDAndO(t *testing.T) {
	tasksFile := filepath.Join(t.TempDir(), "tasks")
	if err := os.WriteFile(tasksFile, []byte("t1\nt2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "out.jsonl")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"tasks with id", []string{"-tasks", "eval/*", "-id", "j1", "--", "true"}, "-id names one job; each job of a fan-out"},
		{"tasks-file with id", []string{"-tasks-file", tasksFile, "-id", "j1", "--", "true"}, "-id names one job; each job of a fan-out"},
		{"terminate tasks with id", []string{"-terminate", "-tasks", "eval/*", "-id", "j1"}, "-id names one job"},
		{"tasks with o", []string{"-tasks", "eval/*", "-o", out, "-wait", "--", "true"}, "-o is for batches"},
		{"tasks-file with o", []string{"-tasks-file", tasksFile, "-o", out, "--", "true"}, "-o is for batches"},
		{"schedule with id", []string{"-schedule", "s", "-cron", "@daily", "-task", "t", "-id", "j1", "--", "true"}, "each tick's job gets its own"},
		{"schedule over tasks with id", []string{"-schedule", "s", "-cron", "@daily", "-tasks", "eval/*", "-id", "j1", "--", "true"}, "each tick's job gets its own"},
		{"schedule with o", []string{"-schedule", "s", "-cron", "@daily", "-task", "t", "-o", out, "--", "true"}, "-o is for batches"},
		{"terminate schedule with o", []string{"-schedule", "s", "-cron", "@daily", "-terminate", "-tasks", "**", "-o", out}, "-o is for batches"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"-redis", "redis://127.0.0.1:1/0"}, tt.args...)
			var stdout, stderr bytes.Buffer
			err := run(context.Background(), args, noenv, strings.NewReader(""), &stdout, &stderr)
			var ue *app.UsageError
			if !errors.As(err, &ue) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("run(%q) = %v; want a usage error containing %q", args, err, tt.want)
			}
			if _, serr := os.Stat(out); serr == nil {
				t.Errorf("run(%q) created the -o file", args)
			}
		})
	}
}
