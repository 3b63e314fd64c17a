package jobs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/sandboxpool"
)

// DefaultTaskCheckInterval is WorkerConfig.TaskCheckInterval's default.
// An idle worker is woken when a job becomes runnable (wake.go), so the
// interval is only the safety net for what publishes no wake-up (asynqmon's
// "run now", a plain asynq client's enqueue, a wake-up lost in a
// reconnect): such a job waits a second at most. An idle worker costs
// Redis one dequeue round (three commands per queue) per interval.
const DefaultTaskCheckInterval = time.Second

// pollWithoutWakeups is how often a worker without wake-ups (a Redis
// client it cannot copy, wake.go's ownClient) polls when
// TaskCheckInterval is not set: asynq's poll as boxq ran it before
// wake-ups, ≈ 3 ms of pickup for ≈ 1,000 Redis commands/s per idle worker
// (docs/PERFORMANCE.md).
const pollWithoutWakeups = 5 * time.Millisecond

// WorkerConfig configures a Worker. Zero values take the documented defaults.
type WorkerConfig struct {
	// Redis is the one client shared by asynq and the pool. Required.
	Redis redis.UniversalClient
	// Gateway runs execs. Required.
	Gateway Gateway
	// Pool lends sandboxes. Required.
	Pool Pool
	// Concurrency is how many jobs run at once. Most of a job is waiting on
	// the gateway, so the default is high: 256.
	Concurrency int
	// Queues and their weights (asynq's weighted priority); default
	// {"default": 1}. The worker also serves MaintenanceQueue, whatever
	// Queues says, with the weight of all of them together.
	Queues map[string]int
	// TaskCheckInterval is how long an idle worker waits for a wake-up
	// before it asks Redis for a job anyway. Enqueues, a task's next turn
	// and asynq's forwarder wake it at once (wake.go); this bounds the
	// pickup of a job made runnable otherwise, against the idle load on
	// Redis (one dequeue round per interval per worker). With a Redis
	// client the worker cannot copy (a Sentinel failover client, a Ring,
	// not go-redis's: wake.go's ownClient) there are no wake-ups, and asynq
	// polls every interval (sleeping a random 0.5 to 1.5 of it), 5 ms when
	// unset: then pickup takes about half an interval. Default
	// DefaultTaskCheckInterval.
	TaskCheckInterval time.Duration
	// DelayedTaskCheckInterval is how often retries and capacity waits are
	// moved back to their queue. Default 500ms.
	DelayedTaskCheckInterval time.Duration
	// ShutdownTimeout is how long running jobs may go on after a stop
	// signal; after it their execs are left running and the jobs go back to
	// the queue, to be re-attached by the next worker. Default 25s.
	ShutdownTimeout time.Duration
	// IdleTTL: sandboxes unused for this long are terminated. Default 5m.
	IdleTTL time.Duration
	// ReapEvery is the reaper's tick; 0 = default 30s, negative = no reaper.
	// The same tick repairs the task sequences of Queues.
	ReapEvery time.Duration
	// SeqRepairAfter is how long a task sequence's head may keep its turn
	// unchanged before the reaper's tick looks at it (deleted or archived
	// from the dashboard, its producer dead mid-enqueue). Default
	// DefaultSeqRepairAfter.
	SeqRepairAfter time.Duration
	// RescueEvery is how often the worker looks for commands left running
	// by dead workers, to finish their jobs (Rescuer); 0 = default 1s,
	// negative = never.
	RescueEvery time.Duration
	// SandboxLifetime is the lifetime asked of the gateway for new
	// sandboxes (its timeoutMs). A persistent sandbox is rotated between
	// commands when the next command's timeout would not fit in what is
	// left of it; a non-persistent one is not (its files would be lost),
	// so give it a lifetime that fits the task. Default 1h.
	SandboxLifetime time.Duration
	// MaxOutput caps a result's output (head and tail kept). Default 1 MiB.
	MaxOutput int
	// CapacityLogEvery bounds how often the worker logs, at info, that
	// jobs wait for capacity (the pool's cap or the gateway's 429, in the
	// gateway's words). Default 10s.
	CapacityLogEvery time.Duration
	// Prefix of boxq's own Redis keys (cancel flags). Default "boxq:".
	Prefix  string
	Logger  *slog.Logger
	Metrics *Metrics
	Now     func() time.Time

	// afterJoinDue is a fault point for tests: it runs when a delayed job
	// has joined its sequence to wait, before asynq puts it back.
	afterJoinDue func(jobID string)
}

func (c *WorkerConfig) withDefaults() {
	if c.Concurrency == 0 {
		c.Concurrency = 256
	}
	if len(c.Queues) == 0 {
		c.Queues = map[string]int{DefaultQueue: 1}
	}
	if c.CapacityLogEvery == 0 {
		c.CapacityLogEvery = 10 * time.Second
	}
	if c.TaskCheckInterval == 0 {
		c.TaskCheckInterval = DefaultTaskCheckInterval
	}
	if c.DelayedTaskCheckInterval == 0 {
		c.DelayedTaskCheckInterval = 500 * time.Millisecond
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 25 * time.Second
	}
	if c.IdleTTL == 0 {
		c.IdleTTL = 5 * time.Minute
	}
	if c.ReapEvery == 0 {
		c.ReapEvery = 30 * time.Second
	}
	if c.SeqRepairAfter == 0 {
		c.SeqRepairAfter = DefaultSeqRepairAfter
	}
	if c.RescueEvery == 0 {
		c.RescueEvery = DefaultRescueEvery
	}
	if c.MaxOutput == 0 {
		c.MaxOutput = 1 << 20
	}
	if c.Prefix == "" {
		c.Prefix = "boxq:"
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

func (c *WorkerConfig) validate() error {
	switch {
	case c.Redis == nil:
		return errors.New("jobs: worker needs a Redis client")
	case c.Gateway == nil:
		return errors.New("jobs: worker needs a gateway")
	case c.Pool == nil:
		return errors.New("jobs: worker needs a sandbox pool")
	case c.Concurrency < 1:
		return fmt.Errorf("jobs: concurrency must be at least 1, got %d", c.Concurrency)
	case c.SandboxLifetime < 0:
		return fmt.Errorf("jobs: sandbox lifetime must not be negative, got %v", c.SandboxLifetime)
	case c.IdleTTL < 0:
		return fmt.Errorf("jobs: idle TTL must not be negative, got %v", c.IdleTTL)
	}
	for q, w := range c.Queues {
		switch {
		case q == MaintenanceQueue:
			return fmt.Errorf("jobs: queue %q is boxq's own (terminate and reap jobs); every worker serves it: leave it out", q)
		case strings.TrimSpace(q) == "":
			// asynq would drop it silently, and the waker would wait for
			// a round over a queue nobody dequeues (wake.go).
			return fmt.Errorf("jobs: queue %q: a queue name must not be empty or blank", q)
		case w < 1:
			return fmt.Errorf("jobs: queue %q: weight must be at least 1, got %d", q, w)
		}
	}
	return nil
}

// Worker serves boxq's task types with an asynq server and runs the reaper
// scheduler.
type Worker struct {
	cfg      WorkerConfig
	srv      *asynq.Server
	mux      *asynq.ServeMux
	reaper   *Reaper
	sched    *Scheduler
	rescuer  *Rescuer
	client   *asynq.Client
	stopping chan struct{}
	cancels  *cancelWatch
	// waker and asynqRedis: asynq's own client and its wake-up hook
	// (wake.go); nil when the worker polls.
	waker      *waker
	asynqRedis redis.UniversalClient
	// pollEvery is asynq's TaskCheckInterval: wakePause with wake-ups,
	// else how often the worker polls.
	pollEvery time.Duration
	handlers  sync.WaitGroup // handlers still running, aborted ones included
}

// NewWorker builds a Worker; Run starts it.
func NewWorker(cfg WorkerConfig) (*Worker, error) {
	pollSet := cfg.TaskCheckInterval != 0
	cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	w := &Worker{cfg: cfg, stopping: make(chan struct{}), cancels: newCancelWatch()}
	log := cfg.Logger
	// Every worker serves boxq's maintenance queue (terminate, reap), so a
	// fleet whose workers serve other queues still terminates and reaps.
	// Its weight is that of all the other queues together: maintenance
	// jobs are few and short, and a terminate is meant to act at once,
	// even behind a backlog.
	served := make(map[string]int, len(cfg.Queues)+1)
	total := 0
	for q, wt := range cfg.Queues {
		served[q] = wt
		total += wt
	}
	served[MaintenanceQueue] = total
	capLog := &everyLog{every: cfg.CapacityLogEvery}
	// asynq gets a client of its own, whose hook makes an idle worker wait
	// for a wake-up instead of polling (wake.go).
	asynqRedis := cfg.Redis
	w.pollEvery = cfg.TaskCheckInterval
	if own, ok := ownClient(cfg.Redis); ok {
		servedNames := make([]string, 0, len(served))
		for q := range served {
			servedNames = append(servedNames, q)
		}
		w.waker = newWaker(own, cfg.Prefix, servedNames, cfg.TaskCheckInterval, w.stopping)
		own.AddHook(w.waker)
		w.asynqRedis = own
		asynqRedis, w.pollEvery = own, wakePause
	} else {
		if !pollSet {
			w.pollEvery = pollWithoutWakeups
		}
		log.Info("no wake-ups with this kind of Redis client (a Sentinel failover client, a Ring, or not go-redis's): the worker polls for jobs", "poll_interval", w.pollEvery)
	}
	w.srv = asynq.NewServerFromRedisClient(asynqRedis, asynq.Config{
		Concurrency:              cfg.Concurrency,
		Queues:                   served,
		TaskCheckInterval:        w.pollEvery,
		DelayedTaskCheckInterval: cfg.DelayedTaskCheckInterval,
		ShutdownTimeout:          cfg.ShutdownTimeout,
		IsFailure:                isFailure,
		RetryDelayFunc:           retryDelay,
		Logger:                   asynqLogger{log.With("component", "asynq")},
		LogLevel:                 asynq.WarnLevel,
		ErrorHandler: asynq.ErrorHandlerFunc(func(ctx context.Context, t *asynq.Task, err error) {
			id, _ := asynq.GetTaskID(ctx)
			var rl *retryLater
			switch {
			case errors.As(err, &rl) && rl.wait == WaitCapacity:
				// Capacity waits are what stalls a batch: say so at info
				// with the gateway's (or the pool's) words, at most once
				// per CapacityLogEvery, with how many were not logged.
				if n, ok := capLog.allow(time.Now()); ok {
					log.Info("jobs wait for capacity; they come back without using up retries", "job_id", id, "err", rl.err, "waits_since_last_line", n)
				}
			case errors.As(err, &rl), errors.Is(err, context.Canceled):
				log.Debug("job will come back", "job_id", id, "type", t.Type(), "err", err)
			default:
				log.Warn("job attempt failed", "job_id", id, "type", t.Type(), "err", err)
			}
		}),
	})
	exec := &ExecHandler{
		pool: cfg.Pool, gw: cfg.Gateway, store: store{rdb: cfg.Redis, prefix: cfg.Prefix},
		log: log, now: cfg.Now, stopping: w.stopping, cancels: w.cancels, maxOutput: cfg.MaxOutput, metrics: cfg.Metrics,
		lifetime: cfg.SandboxLifetime, afterJoinDue: cfg.afterJoinDue,
	}
	if cfg.ReapEvery > 0 {
		exec.gatewayIdle = max(cfg.IdleTTL+2*cfg.ReapEvery+30*time.Second, 5*time.Minute)
	}
	w.mux = asynq.NewServeMux()
	w.mux.Use(w.track, w.awaitRedis)
	w.mux.Handle(TypeExec, exec)
	queues := make([]string, 0, len(cfg.Queues))
	for q := range cfg.Queues {
		queues = append(queues, q)
	}
	slices.Sort(queues)
	w.mux.Handle(TypeTerminate, &TerminateHandler{pool: cfg.Pool, store: exec.store, log: log})
	w.mux.Handle(TypeReap, &ReapHandler{pool: cfg.Pool, store: exec.store, queues: queues, repairAfter: cfg.SeqRepairAfter, ttl: cfg.IdleTTL, now: cfg.Now, log: log, metrics: cfg.Metrics})
	if cfg.RescueEvery > 0 {
		w.rescuer = &Rescuer{h: exec, every: cfg.RescueEvery, log: log.With("component", "rescuer"), max: cfg.Concurrency}
	}
	if cfg.ReapEvery > 0 {
		w.client = asynq.NewClientFromRedisClient(cfg.Redis)
		// The reap task goes to the maintenance queue, which every worker
		// serves: one reap per tick across the fleet, whatever queues the
		// workers serve.
		w.reaper = &Reaper{client: w.client, rdb: cfg.Redis, prefix: cfg.Prefix, every: cfg.ReapEvery, queue: MaintenanceQueue, now: cfg.Now, log: log}
	}
	// Every worker runs the schedules (schedule.go), reading them again on
	// every reap tick.
	prod, err := NewProducer(cfg.Redis, ProducerConfig{Prefix: cfg.Prefix, Logger: log})
	if err != nil {
		return nil, err
	}
	reload := cfg.ReapEvery
	if reload <= 0 {
		reload = 30 * time.Second
	}
	w.sched = NewScheduler(prod, sandboxpool.NewIndex(cfg.Redis, cfg.Prefix), reload, cfg.Now, log)
	return w, nil
}

// track counts running handlers, so Run can wait for the cleanup of jobs
// that asynq stopped waiting for at shutdown.
func (w *Worker) track(next asynq.Handler) asynq.Handler {
	return asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
		w.handlers.Add(1)
		defer w.handlers.Done()
		return next.ProcessTask(ctx, t)
	})
}

// redisOutageWait bounds how long awaitRedis holds a failed attempt:
// under asynq's 30 s lease, which goes unrenewed while Redis is away.
const redisOutageWait = 20 * time.Second

// awaitRedis holds the end of a failed job attempt while Redis does not
// answer (for at most redisOutageWait), so that asynq can record it. asynq
// v0.26 cannot record the end of an attempt when Redis is away at that
// moment: its syncer retries the write with a context that has already been
// cancelled, so the job stays "active" until its lease lapses and the
// recoverer, once a minute, sends it back, one or two minutes later
// (reliability.TestRedisRestart). A successful attempt has just written
// its result, so it needs no check.
func (w *Worker) awaitRedis(next asynq.Handler) asynq.Handler {
	return asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
		err := next.ProcessTask(ctx, t)
		if err == nil {
			return nil
		}
		deadline := time.Now().Add(redisOutageWait)
		for {
			pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			perr := w.cfg.Redis.Ping(pctx).Err()
			cancel()
			if perr == nil || !time.Now().Before(deadline) {
				return err
			}
			pause := time.NewTimer(250 * time.Millisecond)
			select {
			case <-pause.C:
			case <-w.stopping:
				pause.Stop()
				return err
			}
		}
	})
}

// Run serves jobs until ctx ends, then shuts down gracefully: no new jobs,
// running ones get ShutdownTimeout to finish, the rest are put back in the
// queue with their execs left running, to be re-attached.
func (w *Worker) Run(ctx context.Context) error {
	// Listening for cancels before taking jobs, and until the last handler
	// is done.
	watchCtx, stopWatch := context.WithCancel(context.WithoutCancel(ctx))
	cancelSub := w.cfg.Redis.Subscribe(watchCtx, asynqCancelChannel)
	var watching sync.WaitGroup
	watching.Go(func() { w.cancels.run(watchCtx, cancelSub) })
	if w.waker != nil {
		watching.Go(func() { w.waker.listen(watchCtx, w.cfg.Redis) })
	}
	defer func() {
		stopWatch()
		watching.Wait()
		if w.asynqRedis != nil {
			w.asynqRedis.Close() // asynq is done with it
		}
	}()
	if err := w.srv.Start(w.mux); err != nil {
		return fmt.Errorf("jobs: start worker: %w", err)
	}
	var wg sync.WaitGroup
	if w.reaper != nil {
		wg.Go(func() { _ = w.reaper.Run(ctx) })
	}
	if w.rescuer != nil {
		wg.Go(func() { _ = w.rescuer.Run(ctx) })
	}
	wg.Go(func() { w.promoteLate(ctx) })
	wg.Go(func() { _ = w.sched.Run(ctx) })
	<-ctx.Done()
	w.cfg.Logger.Info("stopping: waiting for running jobs", "timeout", w.cfg.ShutdownTimeout)
	close(w.stopping)
	w.srv.Shutdown()
	wg.Wait()
	done := make(chan struct{})
	go func() { w.handlers.Wait(); close(done) }()
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		w.cfg.Logger.Warn("some jobs did not finish their cleanup in time")
	}
	return nil
}

// lateEvery is how often a worker promotes the heads that were handed the
// turn while they were being enqueued.
const lateEvery = 500 * time.Millisecond

// promoteLate runs until ctx ends: twice a second, for every queue asynq
// knows, it promotes late heads (sequence.go).
func (w *Worker) promoteLate(ctx context.Context) {
	t := time.NewTicker(lateEvery)
	defer t.Stop()
	s := store{rdb: w.cfg.Redis, prefix: w.cfg.Prefix}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		queues, err := w.cfg.Redis.SMembers(ctx, asynqQueuesKey).Result()
		if err != nil {
			continue
		}
		for _, q := range queues {
			if err := s.promoteLate(ctx, q); err != nil && ctx.Err() == nil {
				w.cfg.Logger.Warn("promote late heads", "queue", q, "err", err)
			}
		}
	}
}

// isFailure tells asynq which errors count against a job's retries:
// capacity waits and cancellations do not.
func isFailure(err error) bool {
	var rl *retryLater
	return !errors.As(err, &rl) && !errors.Is(err, context.Canceled)
}

// retryDelay: capacity waits come back after their own delay (with jitter,
// so waiting jobs do not return in a herd); cancelled jobs at once (their
// next delivery records the result); faults back off exponentially from 1s
// to a minute.
func retryDelay(n int, err error, _ *asynq.Task) time.Duration {
	var rl *retryLater
	switch {
	case errors.As(err, &rl) && rl.park:
		return time.Until(parkedAt)
	case errors.As(err, &rl) && rl.exact:
		return rl.after
	case errors.As(err, &rl):
		return rl.after + rand.N(rl.after/2+1)
	case errors.Is(err, context.Canceled):
		return 0
	}
	d := time.Second << min(n, 6)
	return min(d, time.Minute) + rand.N(d/4+1)
}

// everyLog lets a log line through at most once per every, counting the
// ones it held back.
type everyLog struct {
	every time.Duration
	mu    sync.Mutex
	last  time.Time
	held  int
}

// allow reports whether a line may be logged at now, and how many were
// held back since the last one.
func (e *everyLog) allow(now time.Time) (held int, ok bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.last.IsZero() && now.Sub(e.last) < e.every {
		e.held++
		return 0, false
	}
	held, e.held, e.last = e.held, 0, now
	return held, true
}

// asynqLogger sends asynq's log lines to slog.
type asynqLogger struct{ l *slog.Logger }

func (a asynqLogger) Debug(args ...any) { a.l.Debug(fmt.Sprint(args...)) }
func (a asynqLogger) Info(args ...any)  { a.l.Info(fmt.Sprint(args...)) }
func (a asynqLogger) Warn(args ...any)  { a.l.Warn(fmt.Sprint(args...)) }
func (a asynqLogger) Error(args ...any) { a.l.Error(fmt.Sprint(args...)) }
func (a asynqLogger) Fatal(args ...any) { a.l.Error(fmt.Sprint(args...)) }
