package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
