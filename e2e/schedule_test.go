package e2e

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
)

// TestScheduledAndFanOut runs the README's "Scheduled jobs" and "Fan-out"
// commands through the programs: a real redis-server, the gateway and two
// workers as processes, and enqueue: the example batch makes the demo
// tasks' sandboxes; a fan-out over examples/fanout-tasks.txt and over a
// glob, with its summary; a job delayed by 2 s runs no earlier; a cleanup
// command scheduled over every live sandbox; and the nightly cleanup
// schedule, which ends every live sandbox at its tick.
func TestScheduledAndFanOut(t *testing.T) {
	binaries(t)
	srv := redistest.StartServer(t)
	redisURL := srv.URL(0)
	token := randomToken(t)
	gwAddr := freeAddr(t)
	gw := start(t, progGateway, []string{progGateway, "-addr", gwAddr, "-state-dir", t.TempDir()}, map[string]string{"GATEWAY_TOKEN": token})
	waitHealthy(t, gw, gwAddr, startLimit)
	env := map[string]string{"REDIS_URL": redisURL, "GATEWAY_URL": "http://" + gwAddr, "GATEWAY_TOKEN": token}
	for i := range 2 {
		addr := freeAddr(t)
		w := start(t, progWorker+strconv.Itoa(i), []string{progWorker, "-http", addr, "-reap-every", "1s", "-log-level", "warn"}, env)
		waitHealthy(t, w, addr, startLimit)
	}
	enqueue := func(args ...string) (string, string, int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), batchLimit)
		defer cancel()
		return run(ctx, t, append([]string{progEnqueue}, args...), map[string]string{"REDIS_URL": redisURL})
	}
	if _, stderr, code := enqueue("-f", demoBatch, "-wait"); code != 0 {
		t.Fatalf("the example batch exited %d: %s", code, stderr)
	}

	t.Run("fan-out", func(t *testing.T) {
		stdout, stderr, code := enqueue("-tasks-file", filepath.Join(repoRoot, "examples", "fanout-tasks.txt"), "-wait", "--", "echo hi")
		_, summary, _ := strings.Cut(stdout, "\n\n")
		want := "4 tasks: 4 completed (rc 0: 4)\n\ndemo-a,demo-b,demo-c,demo-d (4 tasks), rc 0:\n    hi\n"
		if code != 0 || summary != want {
			t.Errorf("-tasks-file: exit %d, summary:\n%s\nwant:\n%s\nstderr: %s", code, summary, want, stderr)
		}
		stdout, _, code = enqueue("-tasks", "demo-[ab]", "-wait", "-json", "--", "pwd")
		if n := strings.Count(stdout, "\n"); code != 0 || n != 2 {
			t.Errorf("-tasks 'demo-[ab]' -json: exit %d, %d lines:\n%s", code, n, stdout)
		}
		if _, stderr, code := enqueue("-tasks", "nothing/*", "--", "true"); code != 1 || !strings.Contains(stderr, "no task matches") {
			t.Errorf("a fan-out that matches nothing: exit %d, stderr %q", code, stderr)
		}
	})

	t.Run("in", func(t *testing.T) {
		before := time.Now()
		stdout, stderr, code := enqueue("-in", "2s", "-task", "demo-a", "-wait", "-json", "--", "date +%s.%N")
		var r jobs.Result
		if err := json.Unmarshal([]byte(stdout), &r); code != 0 || err != nil {
			t.Fatalf("-in 2s: exit %d, %v: %s %s", code, err, stdout, stderr)
		}
		ran, err := strconv.ParseFloat(strings.TrimSpace(r.Output), 64)
		if err != nil {
			t.Fatal(err)
		}
		if due := before.Add(2 * time.Second); ran < float64(due.Unix()) || r.StartedAt.Before(due) {
			t.Errorf("-in 2s ran at %.3f (started %v), before %v", ran, r.StartedAt, due)
		}
	})

	t.Run("cache cleanup", func(t *testing.T) {
		if _, stderr, code := enqueue("-tasks", "**", "-wait", "--", "mkdir -p ~/.cache && touch ~/.cache/x"); code != 0 {
			t.Fatalf("fill the caches: exit %d: %s", code, stderr)
		}
		// As the README shows it; then every second, to see it run.
		for _, spec := range []string{"0 2 * * *", "@every 1s"} {
			if _, stderr, code := enqueue("-schedule", "cache-cleanup", "-cron", spec, "-tz", "Europe/Paris", "-tasks", "**", "--", "rm -rf ~/.cache"); code != 0 {
				t.Fatalf("-schedule -cron %q: exit %d: %s", spec, code, stderr)
			}
		}
		want := "5 tasks: 5 completed (rc 0: 5)\n\ndemo-a,demo-b,demo-c,demo-d,demo-e (5 tasks), rc 0:\n    gone\n"
		deadline := time.Now().Add(30 * time.Second)
		for {
			stdout, _, _ := enqueue("-tasks", "**", "-wait", "--", "test -e ~/.cache && echo present || echo gone")
			_, summary, _ := strings.Cut(stdout, "\n\n")
			if summary == want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("caches left 30 s after the cleanup schedule:\n%s", summary)
			}
			time.Sleep(200 * time.Millisecond)
		}
		if _, stderr, code := enqueue("-unschedule", "cache-cleanup"); code != 0 {
			t.Errorf("-unschedule: exit %d: %s", code, stderr)
		}
	})

	t.Run("nightly cleanup", func(t *testing.T) {
		// As the README shows it; then every second, to see it run.
		for _, spec := range []string{"0 3 * * *", "@every 1s"} {
			if _, stderr, code := enqueue("-schedule", "nightly-cleanup", "-cron", spec, "-tz", "Europe/Paris", "-terminate", "-tasks", "**"); code != 0 {
				t.Fatalf("-schedule -cron %q: exit %d: %s", spec, code, stderr)
			}
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, stderr, code := enqueue("-tasks", "**", "--", "true")
			if code == 1 && strings.Contains(stderr, "no task matches") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("sandboxes left 30 s after the cleanup schedule: %s", stderr)
			}
			time.Sleep(200 * time.Millisecond)
		}
		stdout, _, _ := enqueue("-schedules")
		// The last run: a tick, and its jobs (none once nothing is left).
		if !strings.Contains(stdout, "nightly-cleanup") || !strings.Contains(stdout, "Z: ") {
			t.Errorf("-schedules:\n%s", stdout)
		}
		if _, stderr, code := enqueue("-unschedule", "nightly-cleanup"); code != 0 {
			t.Errorf("-unschedule: exit %d: %s", code, stderr)
		}
	})
}
