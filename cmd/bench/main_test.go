package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/boxq/boxq/internal/app"
)

func TestMain(m *testing.M) {
	// The worker-memory measurement re-executes the binary it runs in, and
	// in tests that is this one.
	if os.Getenv(childEnv) == "worker" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := run(ctx, nil, os.Getenv, os.Stdout, os.Stderr)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench worker:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m,
		// go-redis closes a client's pool reaper lazily.
		goleak.IgnoreTopFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).reaper"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

// metricFields are the fields of -json that every full run fills in.
var metricFields = []string{
	"rtt_p50_ms", "rtt_p99_ms", "rtt_true_p50_ms", "direct_rtt_p50_ms",
	"fixedpoll_rtt_p50_ms", "rtt_nostartwait_p50_ms",
	"direct_execs_per_s", "pipeline_execs_per_s",
	"null_pipeline_execs_per_s", "asynq_noop_per_s",
	"reap_ms_100k_100exp", "reap_ms_100k_10kexp",
	"worker_rss_mb_1000_inflight", "worker_rss_inflight",
	"chain_taskmajor_execs_per_s", "chain_stepmajor_execs_per_s",
	"chain_taskmajor_redis_cmds_per_job", "chain_stepmajor_redis_cmds_per_job",
	"waiting_idle_redis_cmds_per_s", "waiting_idle0_redis_cmds_per_s",
	"fixedpoll_over_rtt", "fixedpoll_over_rtt_nostartwait",
	"pipeline_over_direct", "null_pipeline_over_asynq_noop",
	"chain_taskmajor_over_stepmajor", "chain_redis_cmds_taskmajor_over_stepmajor",
	"waiting_idle_over_idle0",
}

// TestQuickRun runs every measurement in quick mode, end to end, and
// checks that each number is there. It makes no claim about the numbers:
// they depend on the machine and on what else runs on it.
func TestQuickRun(t *testing.T) {
	if testing.Short() {
		t.Skip("starts redis-server, gateways and a worker process")
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("BOXQ_REQUIRE_REDIS") == "1" {
			t.Fatal("redis-server is not installed and BOXQ_REQUIRE_REDIS=1")
		}
		t.Skip("redis-server is not installed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	start := time.Now()
	if err := run(ctx, []string{"-quick", "-json"}, os.Getenv, &stdout, &stderr); err != nil {
		t.Fatalf("bench -quick -json: %v\n%s", err, stderr.String())
	}
	t.Logf("quick run took %v", time.Since(start).Round(time.Millisecond))

	var got map[string]any
	if err := json.Unmarshal(stdout.Bytes(), &got); err != nil {
		t.Fatalf("output is not one JSON object: %v\n%s", err, stdout.String())
	}
	for _, k := range metricFields {
		v, ok := got[k].(float64)
		if !ok || v <= 0 {
			t.Errorf("%s = %v, want a positive number", k, got[k])
		}
	}
	rttParts, _ := got["rtt_parts_p50_ms"].(map[string]any)
	for _, k := range []string{"pickup", "handler", "notify"} {
		if v, ok := rttParts[k].(float64); !ok || v <= 0 {
			t.Errorf("rtt_parts_p50_ms[%s] = %v, want a positive number", k, rttParts[k])
		}
	}
	idle, _ := got["idle_redis"].(map[string]any)
	for _, iv := range []string{"1s", "10ms", "5ms"} {
		l, _ := idle[iv].(map[string]any)
		// A worker polling once a second may not poll at all in the quick
		// mode's 300 ms window: zero is a fair count there, not a failure.
		if v, ok := l["ops_per_s"].(float64); !ok || v < 0 || (v == 0 && iv != "1s") {
			t.Errorf("idle_redis[%s].ops_per_s = %v, want a positive number", iv, l["ops_per_s"])
		}
		if v, ok := l["cpu_pct"].(float64); !ok || v < 0 {
			t.Errorf("idle_redis[%s].cpu_pct = %v, want a number", iv, l["cpu_pct"])
		}
	}
	// Where a set-up fell short the number is still there, with a note;
	// the notes are worth seeing.
	if notes, ok := got["notes"]; ok {
		t.Logf("notes: %v", notes)
	}
	if failed, ok := got["failed"]; ok {
		t.Errorf("failed = %v, want none", failed)
	}
	if cfg, _ := got["config"].(map[string]any); cfg["quick"] != true {
		t.Errorf("config = %v, want quick: true", got["config"])
	}
	if t.Failed() {
		t.Logf("output:\n%s", stdout.String())
	}
}

func TestFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string // in the usage error; "" for -h
	}{
		{"help", []string{"-h"}, ""},
		{"unknown phase", []string{"-phases", "latency,speed"}, `unknown measurement "speed"`},
		{"argument", []string{"now"}, `unexpected argument "now"`},
		{"isolation", []string{"-isolation", "vm"}, `-isolation "vm"`},
		{"reap records", []string{"-reap-records", "500"}, "-reap-records must be at least 10000"},
		{"zero samples", []string{"-samples", "0"}, "-samples"},
		{"zero chain steps", []string{"-chain-steps", "0"}, "-chain-steps"},
		{"no waiting jobs", []string{"-waiting", "0"}, "-waiting"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := run(context.Background(), tt.args, func(string) string { return "" }, &stdout, &stderr)
			if tt.want == "" {
				if !errors.Is(err, flag.ErrHelp) || !strings.Contains(stdout.String(), "-quick") {
					t.Errorf("got %v and help %q, want flag.ErrHelp and the flags", err, stdout.String())
				}
				return
			}
			var ue *app.UsageError
			if !errors.As(err, &ue) || !strings.Contains(ue.Msg, tt.want) {
				t.Errorf("got %v, want a usage error about %q", err, tt.want)
			}
		})
	}
}

func TestPrintTable(t *testing.T) {
	r := &report{
		RTTP50: 21.5, RTTP99: 130, FixedPollP50: 252, FixedOverRTT: 11.7,
		PipeOverDir: 0.7, NullOverNoop: 0.45, WorkerRSS: 80, WorkerRSSInflight: 944,
		ChainTaskPerS: 300, ChainStepPerS: 520, ChainTaskOverStep: 0.58,
		ChainTaskCmds: 182.3, ChainStepCmds: 50.1, ChainCmdsOverStep: 3.64,
		WaitingCmdsPerS: 4100, Waiting0CmdsPerS: 520, WaitingOverIdle0: 7.88,
		IdleRedis: map[string]idleLoad{"10ms": {OpsPerS: 300, CPUPct: 1.5}},
		Notes:     []string{"worker memory: never saw 1000 execs running at once"},
		Failed:    map[string]string{"reap": "redis: connection refused"},
		Config: reportConfig{CPUs: 2, Inflight: 1000, Concurrency: 64, TaskCheckInterval: "10ms",
			ChainTasks: 100, ChainSteps: 40, WaitingJobs: 2000},
	}
	var b bytes.Buffer
	printTable(&b, r)
	out := b.String()
	for _, want := range []string{
		"rtt_p50_ms", "21.50", // a value and its goal, met
		"rtt_p99_ms", "MISSED", // 130 > 100
		"null_pipeline / asynq_noop", // 0.45 < 0.5
		"10ms ", "300 commands/s",
		"(944 in flight)", "never saw 1000 execs", // measured short of the set-up, and said so
		"reap: redis: connection refused",
		"chain_taskmajor_execs_per_s (100 × 40 true)", "182.3",
		"waiting_idle_redis_cmds_per_s (2000 waiting)", "7.88",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "direct_execs_per_s") {
		t.Errorf("table shows a measurement that did not run:\n%s", out)
	}
}
