// Command bench measures what boxq costs next to calling a sandbox gateway
// directly and next to a plain asynq queue, side by side in one run.
//
// It starts everything it needs itself: a redis-server on a free loopback
// port, two reference gateways in-process (isolation none by default), and
// workers in-process (and one in a process of its own, to measure a
// worker's memory).
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/jobs"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	app.Exit("bench", err, os.Stderr)
}

const helpHead = `bench — measure boxq's latency, throughput, reaping and memory next to
calling the gateway directly and next to plain asynq, in one run.

Usage:
  bench [flags]

It starts a redis-server (which must be installed) on a free port, the
reference gateway in-process, and workers, and prints a table of results
(with -json: one JSON object). A full run takes two to three minutes;
-quick runs every measurement with fewer samples in well under a minute.
`

const helpTail = `
Measurements (-phases):
  latency    rtt_p50_ms, rtt_p99_ms (sleep 0.01), rtt_true_p50_ms (true):
             enqueue to result seen by the producer, one job at a time, idle
             worker; rtt_parts_p50_ms: pickup, handler, notify;
             direct_rtt_p50_ms: the same command through boxq's gateway
             client alone, no queue
  fixedpoll  fixedpoll_rtt_p50_ms: sleep 0.01 straight at a gateway that
             answers starts at once, by a client that polls at once, then
             every 250 ms (the Python client); rtt_nostartwait_p50_ms: boxq
             through that same gateway
  throughput direct_execs_per_s: true, -execs execs over -sandboxes sandboxes,
             -concurrency clients, straight at the gateway;
             pipeline_execs_per_s: the same commands as jobs (rounds in turn)
  overhead   null_pipeline_execs_per_s: the pipeline against an in-memory
             gateway that completes every exec at once; asynq_noop_per_s:
             plain asynq, no-op handler, same Redis (rounds in turn)
  chain      chain_taskmajor_execs_per_s, chain_stepmajor_execs_per_s: the
             same -chain-tasks × -chain-steps true jobs as one batch, a
             task's steps in a row (task-major) or step 0 of every task,
             then step 1, … (step-major), rounds in turn;
             chain_*_redis_cmds_per_job: Redis commands (all) per job
  waiting    waiting_idle_redis_cmds_per_s: Redis commands/s while
             -waiting jobs of -waiting-tasks tasks wait behind running
             heads (sleep); waiting_idle0_redis_cmds_per_s: the same heads,
             nothing behind them
  reap       reap_ms_100k_100exp, reap_ms_100k_10kexp: one ReapIdle pass
  rss        worker_rss_mb_1000_inflight: a worker process's VmRSS with
             -inflight execs running (or, on a machine too slow to have
             them all running at once, the most it saw: worker_rss_inflight)
  idle       idle_redis: Redis commands/s and CPU of an idle worker at each
             of -idle-intervals

Examples:
  go run ./cmd/bench              # the table
  go run ./cmd/bench -json        # one JSON object
  go run ./cmd/bench -quick -phases latency,overhead
  go build -o /tmp/gw ./cmd/gateway && go run ./cmd/bench -gateway-rss /tmp/gw
`

// options are the bench's settings.
type options struct {
	json, quick      bool
	isolation        string
	redisServer      string
	samples          int
	fixedPollSamples int
	execs            int
	sandboxes        int
	concurrency      int
	nullJobs         int
	rounds           int
	overheadRounds   int
	reapRecords      int
	inflight         int
	hold             time.Duration
	chainTasks       int
	chainSteps       int
	chainRounds      int
	waitingJobs      int
	waitingTasks     int
	waitingHold      time.Duration
	waitingWindow    time.Duration
	checkInterval    time.Duration
	idleWindow       time.Duration
	idleIntervals    []time.Duration
	phases           map[string]bool
	cpuProfile       string
	gatewayRSS       string
}

var allPhases = []string{"latency", "fixedpoll", "throughput", "overhead", "chain", "waiting", "reap", "rss", "idle"}

// effectiveCheckInterval is the worker's task check interval.
func (o *options) effectiveCheckInterval() time.Duration {
	if o.checkInterval > 0 {
		return o.checkInterval
	}
	return jobs.DefaultTaskCheckInterval
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if getenv(childEnv) == "worker" {
		return runWorkerChild(ctx, getenv, stderr)
	}
	o, err := parseFlags(args, stdout)
	if err != nil {
		return err
	}
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err != nil {
			return app.Usagef("-cpuprofile: %v", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	if o.gatewayRSS != "" {
		finished, running := 2000, 1000
		if o.quick {
			finished, running = 200, 100
		}
		return measureGatewayRSS(ctx, o.gatewayRSS, finished, running, stdout, stderr)
	}
	e, err := newEnv(ctx, o, stderr)
	if err != nil {
		return err
	}
	defer e.close()
	begin, load := time.Now(), loadAvg()
	rep, err := e.measure(ctx)
	if err != nil {
		return err
	}
	rep.Config.Seconds = math.Round(time.Since(begin).Seconds())
	rep.Config.LoadAvg = [2]float64{load, loadAvg()}
	if o.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		printTable(stdout, rep)
	}
	if len(rep.Failed) > 0 {
		return fmt.Errorf("%d measurements failed: %s (the others' numbers are above)", len(rep.Failed), strings.Join(slices.Sorted(maps.Keys(rep.Failed)), ", "))
	}
	return nil
}

func parseFlags(args []string, stdout io.Writer) (*options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	o := &options{}
	fs.BoolVar(&o.json, "json", false, "print one JSON object instead of the table")
	fs.BoolVar(&o.quick, "quick", false, "fewer samples and smaller sizes: every measurement, in well under a minute")
	fs.StringVar(&o.isolation, "isolation", string(local.IsolationNone), "the reference gateway's isolation: none, bwrap or auto")
	fs.StringVar(&o.redisServer, "redis-server", "redis-server", "the redis-server `binary` to start")
	fs.IntVar(&o.samples, "samples", 200, "latency samples per measurement (-quick: 20)")
	fs.IntVar(&o.fixedPollSamples, "fixedpoll-samples", 200, "samples of the fixed-interval poller (-quick: 10)")
	fs.IntVar(&o.execs, "execs", 2000, "commands of the throughput measurements (-quick: 300)")
	fs.IntVar(&o.sandboxes, "sandboxes", 200, "sandboxes (tasks) the throughput commands are spread over (-quick: 30)")
	fs.IntVar(&o.concurrency, "concurrency", 256, "worker concurrency (cmd/worker's default), and the direct client's number of concurrent clients")
	fs.IntVar(&o.nullJobs, "null-jobs", 2000, "jobs of the null-gateway pipeline and of plain asynq (-quick: 500)")
	fs.IntVar(&o.rounds, "rounds", 3, "rounds of direct and pipeline, in turn; the median counts (-quick: 1)")
	fs.IntVar(&o.overheadRounds, "overhead-rounds", 5, "rounds of null pipeline and plain asynq, in turn; the median counts (-quick: 2)")
	fs.IntVar(&o.reapRecords, "reap-records", 100_000, "pool records of the reap measurement (-quick: 20000)")
	fs.IntVar(&o.inflight, "inflight", 1000, "execs in flight in the worker-memory measurement (-quick: 100)")
	fs.DurationVar(&o.hold, "hold", 5*time.Second, "how long each exec of the worker-memory measurement runs (-quick: 3s); twice that on a retry")
	fs.IntVar(&o.chainTasks, "chain-tasks", 100, "tasks of the ordered-batch measurement (-quick: 20)")
	fs.IntVar(&o.chainSteps, "chain-steps", 40, "commands per task of the ordered-batch measurement (-quick: 10)")
	fs.IntVar(&o.chainRounds, "chain-rounds", 2, "rounds of task-major and step-major, in turn; the median counts (-quick: 1)")
	fs.IntVar(&o.waitingJobs, "waiting", 2000, "jobs waiting behind running heads in the waiting-load measurement (-quick: 400)")
	fs.IntVar(&o.waitingTasks, "waiting-tasks", 20, "tasks (running heads) of the waiting-load measurement")
	fs.DurationVar(&o.waitingHold, "waiting-hold", 20*time.Second, "how long the heads would run (sleep): they are cancelled once measured")
	fs.DurationVar(&o.waitingWindow, "waiting-window", 3*time.Second, "how long Redis commands are counted, with and without waiting jobs (-quick: 500ms)")
	fs.DurationVar(&o.checkInterval, "task-check-interval", 0, "the workers' task check interval (0: jobs' default)")
	fs.DurationVar(&o.idleWindow, "idle-window", 2*time.Second, "how long idle Redis load is counted per interval (-quick: 300ms)")
	idle := fs.String("idle-intervals", "1s,10ms,5ms", "comma-separated task check `intervals` of the idle-load measurement")
	phases := fs.String("phases", strings.Join(allPhases, ","), "comma-separated `list` of measurements to run")
	fs.StringVar(&o.gatewayRSS, "gateway-rss", "", "measure only the reference gateway's memory: run the gateway `binary` (go build -o /tmp/gw ./cmd/gateway; an older build to compare) with 2,000 finished 1 MiB execs, then 1,000 running (-quick: 200, 100), and print its VmRSS")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the bench process (in-process workers included) to `file`")
	if err := app.ParseFlags(fs, args, stdout, helpHead, helpTail); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, app.Usagef("unexpected argument %q: bench takes flags only", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if o.quick {
		quick := func(name string, p *int, v int) {
			if !set[name] {
				*p = v
			}
		}
		quick("samples", &o.samples, 20)
		quick("fixedpoll-samples", &o.fixedPollSamples, 10)
		quick("execs", &o.execs, 300)
		quick("sandboxes", &o.sandboxes, 30)
		quick("null-jobs", &o.nullJobs, 500)
		quick("inflight", &o.inflight, 100)
		quick("rounds", &o.rounds, 1)
		quick("overhead-rounds", &o.overheadRounds, 2)
		quick("reap-records", &o.reapRecords, 20_000)
		quick("chain-tasks", &o.chainTasks, 20)
		quick("chain-steps", &o.chainSteps, 10)
		quick("chain-rounds", &o.chainRounds, 1)
		quick("waiting", &o.waitingJobs, 400)
		if !set["hold"] {
			o.hold = 3 * time.Second
		}
		if !set["waiting-window"] {
			o.waitingWindow = 500 * time.Millisecond
		}
		if !set["idle-window"] {
			o.idleWindow = 300 * time.Millisecond
		}
	}
	for v := range strings.SplitSeq(*idle, ",") {
		d, err := time.ParseDuration(strings.TrimSpace(v))
		if err != nil || d <= 0 {
			return nil, app.Usagef("-idle-intervals: %q is not a positive duration", v)
		}
		o.idleIntervals = append(o.idleIntervals, d)
	}
	o.phases = map[string]bool{}
	for p := range strings.SplitSeq(*phases, ",") {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		if !slices.Contains(allPhases, p) {
			return nil, app.Usagef("-phases: unknown measurement %q (want some of %s)", p, strings.Join(allPhases, ","))
		}
		o.phases[p] = true
	}
	switch {
	case o.samples < 1, o.fixedPollSamples < 1:
		return nil, app.Usagef("-samples and -fixedpoll-samples must be at least 1")
	case o.execs < 1, o.sandboxes < 1, o.nullJobs < 1, o.rounds < 1, o.overheadRounds < 1:
		return nil, app.Usagef("-execs, -sandboxes, -null-jobs, -rounds and -overhead-rounds must be at least 1")
	case o.concurrency < 1:
		return nil, app.Usagef("-concurrency must be at least 1")
	case o.reapRecords < 10_000:
		return nil, app.Usagef("-reap-records must be at least 10000 (the larger pass expires 10,000)")
	case o.inflight < 1 || o.hold <= 0:
		return nil, app.Usagef("-inflight and -hold must be positive")
	case o.checkInterval < 0 || o.idleWindow <= 0:
		return nil, app.Usagef("-task-check-interval must not be negative, -idle-window must be positive")
	case o.chainTasks < 1 || o.chainSteps < 1 || o.chainRounds < 1:
		return nil, app.Usagef("-chain-tasks, -chain-steps and -chain-rounds must be at least 1")
	case o.waitingJobs < 1 || o.waitingTasks < 1 || o.waitingHold <= 0 || o.waitingWindow <= 0:
		return nil, app.Usagef("-waiting, -waiting-tasks, -waiting-hold and -waiting-window must be positive")
	}
	switch local.Isolation(o.isolation) {
	case local.IsolationNone, local.IsolationBwrap, local.IsolationAuto:
	default:
		return nil, app.Usagef("-isolation %q: want none, bwrap or auto", o.isolation)
	}
	return o, nil
}

// report is the bench's result: what -json prints.
type report struct {
	RTTP50       float64 `json:"rtt_p50_ms,omitempty"`
	RTTP99       float64 `json:"rtt_p99_ms,omitempty"`
	RTTTrueP50   float64 `json:"rtt_true_p50_ms,omitempty"`
	DirectRTTP50 float64 `json:"direct_rtt_p50_ms,omitempty"`
	FixedPollP50 float64 `json:"fixedpoll_rtt_p50_ms,omitempty"`
	RTTNoWaitP50 float64 `json:"rtt_nostartwait_p50_ms,omitempty"`
	DirectPerS   float64 `json:"direct_execs_per_s,omitempty"`
	PipelinePerS float64 `json:"pipeline_execs_per_s,omitempty"`
	NullPerS     float64 `json:"null_pipeline_execs_per_s,omitempty"`
	NoopPerS     float64 `json:"asynq_noop_per_s,omitempty"`
	Reap100      float64 `json:"reap_ms_100k_100exp,omitempty"`
	Reap10k      float64 `json:"reap_ms_100k_10kexp,omitempty"`
	WorkerRSS    float64 `json:"worker_rss_mb_1000_inflight,omitempty"`
	// WorkerRSSInflight is how many execs ran when WorkerRSS was read:
	// -inflight, or fewer where the machine never had them all running at
	// once (Notes says so).
	WorkerRSSInflight int     `json:"worker_rss_inflight,omitempty"`
	ChainTaskPerS     float64 `json:"chain_taskmajor_execs_per_s,omitempty"`
	ChainStepPerS     float64 `json:"chain_stepmajor_execs_per_s,omitempty"`
	ChainTaskCmds     float64 `json:"chain_taskmajor_redis_cmds_per_job,omitempty"`
	ChainStepCmds     float64 `json:"chain_stepmajor_redis_cmds_per_job,omitempty"`
	WaitingCmdsPerS   float64 `json:"waiting_idle_redis_cmds_per_s,omitempty"`
	Waiting0CmdsPerS  float64 `json:"waiting_idle0_redis_cmds_per_s,omitempty"`
	FixedOverRTT      float64 `json:"fixedpoll_over_rtt,omitempty"`
	FixedOverSame     float64 `json:"fixedpoll_over_rtt_nostartwait,omitempty"`
	PipeOverDir       float64 `json:"pipeline_over_direct,omitempty"`
	NullOverNoop      float64 `json:"null_pipeline_over_asynq_noop,omitempty"`
	ChainTaskOverStep float64 `json:"chain_taskmajor_over_stepmajor,omitempty"`
	ChainCmdsOverStep float64 `json:"chain_redis_cmds_taskmajor_over_stepmajor,omitempty"`
	WaitingOverIdle0  float64 `json:"waiting_idle_over_idle0,omitempty"`

	// RTTParts are the medians of the parts of rtt (sleep 0.01): pickup
	// (enqueue to the handler's start), handler (to the result), notify
	// (release, result write, publish, to the producer holding it).
	RTTParts  map[string]float64  `json:"rtt_parts_p50_ms,omitempty"`
	IdleRedis map[string]idleLoad `json:"idle_redis,omitempty"`
	// Runs are the rates of every round; the fields above are medians.
	Runs reportRuns `json:"runs"`
	// Notes say where a measurement could not set up what it meant to
	// and measured what it could: read its number with them.
	Notes []string `json:"notes,omitempty"`
	// Failed are the measurements that ended in an error, and the error;
	// the others ran and their numbers are above.
	Failed map[string]string `json:"failed,omitempty"`
	Config reportConfig      `json:"config"`
}

// reportRuns are the throughput rounds, per second, in the order they
// ran: direct and pipeline (null and noop) alternate, so the i-th of each
// ran side by side.
type reportRuns struct {
	Direct   []float64 `json:"direct_execs_per_s,omitempty"`
	Pipeline []float64 `json:"pipeline_execs_per_s,omitempty"`
	Null     []float64 `json:"null_pipeline_execs_per_s,omitempty"`
	Noop     []float64 `json:"asynq_noop_per_s,omitempty"`
	// Chain rounds: task-major and step-major in turn.
	ChainTask     []float64 `json:"chain_taskmajor_execs_per_s,omitempty"`
	ChainStep     []float64 `json:"chain_stepmajor_execs_per_s,omitempty"`
	ChainTaskCmds []float64 `json:"chain_taskmajor_redis_cmds_per_job,omitempty"`
	ChainStepCmds []float64 `json:"chain_stepmajor_redis_cmds_per_job,omitempty"`
}

func rounded(vs []float64) []float64 { return roundedTo(vs, 0) }

func roundedTo(vs []float64, digits int) []float64 {
	out := make([]float64, len(vs))
	for i, v := range vs {
		out[i] = round(v, digits)
	}
	return out
}

// reportConfig says what was measured, so that numbers of different runs
// can be compared.
type reportConfig struct {
	Quick             bool    `json:"quick"`
	CPUs              int     `json:"cpus"`
	GoVersion         string  `json:"go_version"`
	Isolation         string  `json:"isolation"`
	Concurrency       int     `json:"concurrency"`
	TaskCheckInterval string  `json:"task_check_interval"`
	Samples           int     `json:"samples"`
	FixedPollSamples  int     `json:"fixedpoll_samples"`
	Execs             int     `json:"execs"`
	Sandboxes         int     `json:"sandboxes"`
	NullJobs          int     `json:"null_jobs"`
	ReapRecords       int     `json:"reap_records"`
	Inflight          int     `json:"inflight"`
	ChainTasks        int     `json:"chain_tasks"`
	ChainSteps        int     `json:"chain_steps"`
	ChainRounds       int     `json:"chain_rounds"`
	WaitingJobs       int     `json:"waiting_jobs"`
	WaitingTasks      int     `json:"waiting_tasks"`
	WaitingWindow     string  `json:"waiting_window"`
	Seconds           float64 `json:"seconds"`
	// LoadAvg is /proc/loadavg's 1-minute load at the start and at the
	// end: other work on the machine skews every number.
	LoadAvg [2]float64 `json:"load_avg"`
}

// loadAvg returns the 1-minute load average (0 where unknown).
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f, _, _ := strings.Cut(string(b), " ")
	v, _ := strconv.ParseFloat(f, 64)
	return v
}

func ms(d time.Duration) float64 { return round(float64(d)/float64(time.Millisecond), 2) }

func round(v float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(v*p) / p
}

func ratio(a, b float64) float64 {
	if a == 0 || b == 0 {
		return 0
	}
	return round(a/b, 2)
}

// measure runs the chosen measurements in order.
func (e *env) measure(ctx context.Context) (*report, error) {
	o := e.opts
	rep := &report{Config: reportConfig{
		Quick: o.quick, CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), Isolation: o.isolation,
		Concurrency: o.concurrency, TaskCheckInterval: o.effectiveCheckInterval().String(),
		Samples: o.samples, FixedPollSamples: o.fixedPollSamples, Execs: o.execs, Sandboxes: o.sandboxes,
		NullJobs: o.nullJobs, ReapRecords: o.reapRecords, Inflight: o.inflight,
		ChainTasks: o.chainTasks, ChainSteps: o.chainSteps, ChainRounds: o.chainRounds,
		WaitingJobs: o.waitingJobs, WaitingTasks: o.waitingTasks, WaitingWindow: o.waitingWindow.String(),
	}}
	// A measurement that fails is reported and the others still run: one
	// bad phase does not cost the numbers of the rest.
	step := func(name string, f func() error) {
		if !o.phases[name] {
			return
		}
		start := time.Now()
		e.progress("%s ...", name)
		if err := f(); err != nil {
			if rep.Failed == nil {
				rep.Failed = map[string]string{}
			}
			rep.Failed[name] = err.Error()
			e.progress("%s FAILED after %v: %v", name, time.Since(start).Round(time.Millisecond), err)
			return
		}
		e.progress("%s done in %v", name, time.Since(start).Round(time.Millisecond))
	}
	steps := []struct {
		name string
		f    func() error
	}{
		{"latency", func() error {
			rtts, err := e.pipelineRTT(ctx, e.gw, []string{"sleep 0.01", "true"}, o.samples)
			if err != nil {
				return err
			}
			total := func(s rttSample) time.Duration { return s.total }
			rep.RTTP50, rep.RTTP99 = ms(percentile(parts(rtts[0], total), 50)), ms(percentile(parts(rtts[0], total), 99))
			rep.RTTTrueP50 = ms(percentile(parts(rtts[1], total), 50))
			rep.RTTParts = map[string]float64{
				"pickup":  ms(percentile(parts(rtts[0], func(s rttSample) time.Duration { return s.pickup }), 50)),
				"handler": ms(percentile(parts(rtts[0], func(s rttSample) time.Duration { return s.handler }), 50)),
				"notify":  ms(percentile(parts(rtts[0], func(s rttSample) time.Duration { return s.notify }), 50)),
			}
			direct, err := e.directRTT(ctx, e.gw, "sleep 0.01", o.samples)
			if err != nil {
				return err
			}
			rep.DirectRTTP50 = ms(percentile(direct, 50))
			return nil
		}},
		{"fixedpoll", func() error {
			fixed, err := e.fixedPollRTT(ctx, e.gwNoWait, "sleep 0.01", o.fixedPollSamples)
			if err != nil {
				return err
			}
			rep.FixedPollP50 = ms(percentile(fixed, 50))
			rtts, err := e.pipelineRTT(ctx, e.gwNoWait, []string{"sleep 0.01"}, o.samples)
			if err != nil {
				return err
			}
			rep.RTTNoWaitP50 = ms(percentile(parts(rtts[0], func(s rttSample) time.Duration { return s.total }), 50))
			return nil
		}},
		{"throughput", func() error {
			direct, err := e.newDirectRunner(ctx, o.sandboxes, o.concurrency)
			if err != nil {
				return err
			}
			defer direct.close()
			client, err := e.client(e.gw)
			if err != nil {
				return err
			}
			pipe, err := e.newPipelineRunner(ctx, client, o.sandboxes, o.concurrency)
			if err != nil {
				return err
			}
			defer pipe.close()
			d, p, err := compare(ctx, direct, pipe, o.execs, o.rounds)
			if err != nil {
				return err
			}
			rep.PipeOverDir = round(pairRatio(p, d), 2)
			rep.Runs.Direct, rep.Runs.Pipeline = rounded(d), rounded(p)
			rep.DirectPerS, rep.PipelinePerS = round(median(d), 0), round(median(p), 0)
			return nil
		}},
		{"overhead", func() error {
			null, err := e.newPipelineRunner(ctx, instantGateway{}, o.sandboxes, o.concurrency)
			if err != nil {
				return err
			}
			defer null.close()
			noop, err := e.newNoopRunner(ctx, o.concurrency)
			if err != nil {
				return err
			}
			defer noop.close()
			a, b, err := compare(ctx, null, noop, o.nullJobs, o.overheadRounds)
			if err != nil {
				return err
			}
			rep.NullOverNoop = round(pairRatio(a, b), 2)
			rep.Runs.Null, rep.Runs.Noop = rounded(a), rounded(b)
			rep.NullPerS, rep.NoopPerS = round(median(a), 0), round(median(b), 0)
			return nil
		}},
		{"chain", func() error {
			tm, sm, err := e.chains(ctx, o.chainTasks, o.chainSteps, o.chainRounds)
			if err != nil {
				return err
			}
			col := func(rs []chainRound, f func(chainRound) float64) []float64 {
				out := make([]float64, len(rs))
				for i, r := range rs {
					out[i] = f(r)
				}
				return out
			}
			perS := func(r chainRound) float64 { return r.perS }
			cmds := func(r chainRound) float64 { return r.cmdsPerJob }
			tp, sp, tc, sc := col(tm, perS), col(sm, perS), col(tm, cmds), col(sm, cmds)
			rep.ChainTaskOverStep = round(pairRatio(tp, sp), 2)
			rep.ChainCmdsOverStep = round(pairRatio(tc, sc), 2)
			rep.Runs.ChainTask, rep.Runs.ChainStep = rounded(tp), rounded(sp)
			rep.Runs.ChainTaskCmds, rep.Runs.ChainStepCmds = roundedTo(tc, 1), roundedTo(sc, 1)
			rep.ChainTaskPerS, rep.ChainStepPerS = round(median(tp), 0), round(median(sp), 0)
			rep.ChainTaskCmds, rep.ChainStepCmds = round(median(tc), 1), round(median(sc), 1)
			return nil
		}},
		{"waiting", func() error {
			l, err := e.waitingRedisLoad(ctx, o.waitingTasks, o.waitingJobs, o.waitingHold, o.waitingWindow)
			rep.Notes = append(rep.Notes, l.notes...)
			if err != nil {
				return err
			}
			rep.WaitingCmdsPerS, rep.Waiting0CmdsPerS = round(l.idle, 0), round(l.idle0, 0)
			rep.WaitingOverIdle0 = ratio(l.idle, l.idle0)
			return nil
		}},
		{"reap", func() error {
			ds, err := e.reapIdle(ctx, o.reapRecords, []int{100, 10_000})
			if err != nil {
				return err
			}
			rep.Reap100, rep.Reap10k = ms(ds[0]), ms(ds[1])
			return nil
		}},
		{"rss", func() error {
			v, err := e.workerRSS(ctx, o.inflight, o.hold)
			if err != nil {
				return err
			}
			rep.WorkerRSS, rep.WorkerRSSInflight = round(v.mib, 1), v.inflight
			if v.note != "" {
				rep.Notes = append(rep.Notes, v.note)
			}
			return nil
		}},
		{"idle", func() error {
			rep.IdleRedis = map[string]idleLoad{}
			for _, iv := range o.idleIntervals {
				l, err := e.idleRedisLoad(ctx, iv, o.idleWindow)
				if err != nil {
					return err
				}
				l.OpsPerS, l.CPUPct = round(l.OpsPerS, 0), round(l.CPUPct, 1)
				rep.IdleRedis[iv.String()] = l
			}
			return nil
		}},
	}
	for _, s := range steps {
		step(s.name, s.f)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	rep.FixedOverRTT = ratio(rep.FixedPollP50, rep.RTTP50)
	rep.FixedOverSame = ratio(rep.FixedPollP50, rep.RTTNoWaitP50)
	return rep, nil
}

// printTable writes the report as a table with the goals.
func printTable(w io.Writer, r *report) {
	c := r.Config
	mode := "full"
	if c.Quick {
		mode = "quick"
	}
	fmt.Fprintf(w, "boxq bench (%s): %d CPUs, %s, isolation %s, worker concurrency %d, task check interval %s, %.0fs, load %.1f → %.1f\n\n",
		mode, c.CPUs, c.GoVersion, c.Isolation, c.Concurrency, c.TaskCheckInterval, c.Seconds, c.LoadAvg[0], c.LoadAvg[1])
	type row struct {
		name  string
		v     float64
		goal  string
		check func(float64) bool
	}
	le := func(g float64) func(float64) bool { return func(v float64) bool { return v <= g } }
	ge := func(g float64) func(float64) bool { return func(v float64) bool { return v >= g } }
	rows := []row{
		{"rtt_p50_ms (sleep 0.01, enqueue → result)", r.RTTP50, "≤ 25", le(25)},
		{"rtt_p99_ms", r.RTTP99, "≤ 100", le(100)},
		{"rtt_true_p50_ms", r.RTTTrueP50, "", nil},
		{"direct_rtt_p50_ms (gateway client, no queue)", r.DirectRTTP50, "", nil},
		{"fixedpoll_rtt_p50_ms (250 ms poller)", r.FixedPollP50, "", nil},
		{"rtt_nostartwait_p50_ms (same gateway as poller)", r.RTTNoWaitP50, "", nil},
		{"direct_execs_per_s", r.DirectPerS, "", nil},
		{"pipeline_execs_per_s", r.PipelinePerS, "", nil},
		{"null_pipeline_execs_per_s", r.NullPerS, "", nil},
		{"asynq_noop_per_s", r.NoopPerS, "", nil},
		{"reap_ms_100k_100exp", r.Reap100, "≤ 50", le(50)},
		{"reap_ms_100k_10kexp", r.Reap10k, "", nil},
		{fmt.Sprintf("worker_rss_mb_1000_inflight (%d in flight)", cmp.Or(r.WorkerRSSInflight, c.Inflight)), r.WorkerRSS, "≤ 200", le(200)},
		{"fixedpoll / rtt", r.FixedOverRTT, "≥ 8", ge(8)},
		{"fixedpoll / rtt_nostartwait", r.FixedOverSame, "", nil},
		{"pipeline / direct", r.PipeOverDir, "≥ 0.6", ge(0.6)},
		{"null_pipeline / asynq_noop", r.NullOverNoop, "≥ 0.5", ge(0.5)},
		{fmt.Sprintf("chain_taskmajor_execs_per_s (%d × %d true)", c.ChainTasks, c.ChainSteps), r.ChainTaskPerS, "", nil},
		{"chain_stepmajor_execs_per_s", r.ChainStepPerS, "", nil},
		{"chain_taskmajor_redis_cmds_per_job", r.ChainTaskCmds, "", nil},
		{"chain_stepmajor_redis_cmds_per_job", r.ChainStepCmds, "", nil},
		{"chain task-major / step-major, execs/s", r.ChainTaskOverStep, "≥ 0.9", ge(0.9)},
		{"chain task-major / step-major, cmds/job", r.ChainCmdsOverStep, "≤ 1.2", le(1.2)},
		{fmt.Sprintf("waiting_idle_redis_cmds_per_s (%d waiting)", c.WaitingJobs), r.WaitingCmdsPerS, "", nil},
		{"waiting_idle0_redis_cmds_per_s (0 waiting)", r.Waiting0CmdsPerS, "", nil},
		{"waiting_idle / waiting_idle0", r.WaitingOverIdle0, "≈ 1", func(v float64) bool { return v >= 0.8 && v <= 1.2 }},
	}
	fmt.Fprintf(w, "%-50s %10s  %-7s %s\n", "metric", "value", "goal", "")
	for _, row := range rows {
		if row.v == 0 {
			continue
		}
		status := ""
		if row.check != nil {
			status = "ok"
			if !row.check(row.v) {
				status = "MISSED"
			}
		}
		fmt.Fprintf(w, "%-50s %10s  %-7s %s\n", row.name, fmtValue(row.v), row.goal, status)
	}
	if p := r.RTTParts; len(p) > 0 {
		fmt.Fprintf(w, "\nrtt (sleep 0.01), median parts: pickup %.2f ms, handler %.2f ms, notify %.2f ms\n", p["pickup"], p["handler"], p["notify"])
	}
	if len(r.Notes) > 0 {
		fmt.Fprintf(w, "\nnotes:\n")
		for _, n := range r.Notes {
			fmt.Fprintf(w, "  %s\n", n)
		}
	}
	if len(r.Failed) > 0 {
		fmt.Fprintf(w, "\nfailed:\n")
		for _, name := range slices.Sorted(maps.Keys(r.Failed)) {
			fmt.Fprintf(w, "  %s: %s\n", name, r.Failed[name])
		}
	}
	if len(r.IdleRedis) > 0 {
		fmt.Fprintf(w, "\nidle worker's Redis load by task check interval:\n")
		ivs := slices.Collect(maps.Keys(r.IdleRedis))
		slices.SortFunc(ivs, func(a, b string) int {
			da, _ := time.ParseDuration(a)
			db, _ := time.ParseDuration(b)
			return cmp.Compare(db, da)
		})
		for _, iv := range ivs {
			l := r.IdleRedis[iv]
			fmt.Fprintf(w, "  %-6s %7.0f commands/s  %5.1f%% of a core\n", iv, l.OpsPerS, l.CPUPct)
		}
	}
}

func fmtValue(v float64) string {
	switch {
	case v >= 1000:
		return fmt.Sprintf("%.0f", v)
	case v >= 100:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}
