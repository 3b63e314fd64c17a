// Command api serves boxq over HTTP: enqueue jobs, wait for their results,
// cancel them, terminate tasks, from any language (clients/python is the
// Python client).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/internal/devstack"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	app.Exit("api", err, os.Stderr)
}

const helpHead = `api — the boxq HTTP API: enqueue commands and wait for their results over HTTP.

Usage:
  api [-addr 127.0.0.1:8080] [-redis URL] [-token T] [-dev]

Routes (the OpenAPI 3 document is served at /v1/openapi.json):
  POST /v1/jobs[?wait=30s]             one job (the JSON job of the README): 202 {"id"};
                                       with wait, 200 and the result if it ends in time, else 202 and its state
  POST /v1/jobs/batch[?wait=10m]       a JSONL body; NDJSON answer: one {"line","id"} or {"line","error"}
                                       per line, then with wait each {"line","result"} as it finishes and
                                       a {"summary"} line
  GET  /v1/jobs/{id}[?wait=30s]        200 the result, or 202 the state (pending, waiting, running, ...); 404 unknown
  POST /v1/jobs/{id}/cancel            cancel a job
  GET  /v1/tasks/{task}                the task's sandbox, cwd, last use and waiting jobs
  POST /v1/tasks/{task}/terminate      end the task's sandbox now (?if_idle=true: only when idle)
  GET  /v1/schedules                   the recurring schedules: spec, zone, target, next run, last run and its results
  PUT  /v1/schedules/{name}            add or replace a schedule (body: {"cron","tz"?,"task"|"tasks","job"|"terminate"});
                                       200 the schedule as stored; 400 a bad spec or zone, in enqueue -schedule's words
  DELETE /v1/schedules/{name}          remove a schedule: 204; 404 unknown
  GET  /healthz                        200 when Redis answers

Every /v1 route but the OpenAPI document needs "Authorization: Bearer TOKEN"
when a token is set. Without a token the API listens on loopback only.
Waits are served by one Redis subscriber for the whole process, whoever
enqueued the job.

Environment:
  REDIS_URL        default for -redis (redis://127.0.0.1:6379/0)
  BOXQ_API_TOKEN   default for -token (prefer it to the flag: flags show in ps)
`

const helpTail = `
Examples:
  # try it with nothing installed: embedded Redis, gateway and worker
  go run ./cmd/api -dev
  curl -s -XPOST 'localhost:8080/v1/jobs?wait=30s' -d '{"task_id":"t1","command":"echo hi"}'
  # in front of a real Redis, workers elsewhere
  BOXQ_API_TOKEN=change-me api -addr 0.0.0.0:8080 -redis redis://redis:6379/0
`

type options struct {
	addr          string
	redisURL      string
	token         string
	dev           bool
	maxBatchBytes int64
	retention     time.Duration
	maxRetry      int
	logFormat     string
	logLevel      string
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	var o options
	fs := flag.NewFlagSet("api", flag.ContinueOnError)
	fs.StringVar(&o.addr, "addr", "127.0.0.1:8080", "`address` to listen on (port 0: any free port, printed at start)")
	fs.StringVar(&o.redisURL, "redis", app.EnvOr(getenv, "REDIS_URL", "redis://127.0.0.1:6379/0"), "Redis `URL` (env REDIS_URL)")
	fs.StringVar(&o.token, "token", getenv("BOXQ_API_TOKEN"), "bearer `token` clients must send (env BOXQ_API_TOKEN); none: loopback only")
	fs.BoolVar(&o.dev, "dev", false, "embedded Redis, gateway and worker in this process: needs nothing installed")
	fs.Int64Var(&o.maxBatchBytes, "max-batch-bytes", 256<<20, "largest batch body, read whole before answering (413 beyond)")
	fs.DurationVar(&o.retention, "retention", 24*time.Hour, "how long results are kept in Redis")
	fs.IntVar(&o.maxRetry, "max-retry", 8, "retries after infrastructure faults (capacity waits do not count)")
	fs.StringVar(&o.logFormat, "log-format", "auto", "log format: auto, text or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level")
	if err := app.ParseFlags(fs, args, stdout, helpHead, helpTail); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return app.Usagef("unexpected arguments %q: api takes flags only", fs.Args())
	case o.maxBatchBytes <= 0:
		return app.Usagef("-max-batch-bytes must be positive")
	case o.maxRetry < 0 || o.retention <= 0:
		return app.Usagef("-max-retry must not be negative and -retention must be positive")
	}
	log, err := app.NewLogger(stderr, o.logFormat, o.logLevel)
	if err != nil {
		return app.Usagef("%v", err)
	}
	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return app.Usagef("-addr %s: %v", o.addr, err)
	}
	defer ln.Close()
	if o.token == "" && !isLoopback(ln.Addr()) {
		return app.Usagef("-addr %s is not a loopback address: set a token (BOXQ_API_TOKEN or -token), or listen on 127.0.0.1", o.addr)
	}

	var worker sync.WaitGroup
	if o.dev {
		stack, stopWorker, err := startDev(ctx, log, &worker)
		if err != nil {
			return err
		}
		defer func() {
			stopWorker()
			worker.Wait()
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			_ = stack.Close(cctx)
		}()
		o.redisURL = stack.RedisURL
	}

	rdb, err := connectRedis(ctx, o.redisURL)
	if err != nil {
		return err
	}
	defer rdb.Close()
	s, err := newServer(ctx, rdb, jobs.ProducerConfig{Retention: o.retention, MaxRetry: o.maxRetry, Logger: log}, o.token, o.maxBatchBytes)
	if err != nil {
		return err
	}
	defer s.hub.Close()

	// Requests' contexts end with ctx, so that long polls answer at once
	// on shutdown instead of holding it up.
	srv := &http.Server{Handler: s.handler(), ReadHeaderTimeout: 10 * time.Second,
		BaseContext: func(net.Listener) context.Context { return ctx }}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	log.Info("api listening", "addr", ln.Addr().String(), "dev", o.dev, "auth", o.token != "")
	// A line for scripts and tests that start the API on port 0.
	fmt.Fprintf(stdout, "boxq api listening on http://%s\n", ln.Addr())

	select {
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	err = srv.Shutdown(sctx)
	if serr := <-served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return err
}

// redisPoolSize bounds the API's Redis connections, whatever the number
// of cores and of clients: a request holds a connection only for its short
// lookups, and every wait shares the hub's one subscriber.
const redisPoolSize = 32

// connectRedis opens the API's Redis client: at most redisPoolSize
// connections (go-redis otherwise opens more than PoolSize under load),
// plus its pipeline pool and the hub's subscriber.
func connectRedis(ctx context.Context, url string) (*redis.Client, error) {
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, app.Usagef("redis URL %q: %v (want redis://host:port/db)", app.RedactURL(url), err)
	}
	opt.PoolSize, opt.MaxActiveConns = redisPoolSize, redisPoolSize
	rdb := redis.NewClient(opt)
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := rdb.Ping(pctx).Err(); err != nil {
		rdb.Close()
		return nil, fmt.Errorf("cannot reach Redis at %s: %w (is redis-server running? set -redis or REDIS_URL)", opt.Addr, err)
	}
	return rdb, nil
}

// newServer returns the API's server on rdb. Close its hub when done.
func newServer(ctx context.Context, rdb *redis.Client, cfg jobs.ProducerConfig, token string, maxBatchBytes int64) (*server, error) {
	prod, err := jobs.NewProducer(rdb, cfg)
	if err != nil {
		return nil, err
	}
	pool, err := sandboxpool.New(rdb, readOnlyGateway{}, sandboxpool.Config{})
	if err != nil {
		return nil, err
	}
	hub, err := prod.NewHub(ctx)
	if err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &server{rdb: rdb, prod: prod, hub: hub, pool: pool, token: token, maxBatchBytes: maxBatchBytes, log: log}, nil
}

func isLoopback(a net.Addr) bool {
	ta, ok := a.(*net.TCPAddr)
	return ok && ta.IP.IsLoopback()
}

// readOnlyGateway is the gateway of the API's pool, which only reads task
// records: the API never creates or terminates a sandbox itself (workers
// do, on its jobs).
type readOnlyGateway struct{}

var errReadOnly = errors.New("api: the API reads the pool; workers create and terminate sandboxes")

func (readOnlyGateway) Create(context.Context, string, gateway.CreateRequest) (string, error) {
	return "", errReadOnly
}
func (readOnlyGateway) Terminate(context.Context, string, bool) error { return errReadOnly }

// startDev starts the embedded Redis and gateway and a worker on them, as
// enqueue -dev does.
func startDev(ctx context.Context, log *slog.Logger, wg *sync.WaitGroup) (*devstack.Stack, func(), error) {
	stack, err := devstack.Start(log, local.IsolationAuto)
	if err != nil {
		return nil, nil, err
	}
	wctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	ready := make(chan struct{})
	failed := make(chan error, 1)
	wg.Go(func() {
		err := app.RunWorker(wctx, app.WorkerOptions{
			RedisURL: stack.RedisURL, GatewayURL: stack.GatewayURL, Token: stack.Token,
			Concurrency: 64, IdleTTL: 5 * time.Minute, ReapEvery: 30 * time.Second,
			ShutdownTimeout: 2 * time.Second, Logger: log,
			OnReady: func(string) { close(ready) },
		})
		failed <- err
	})
	select {
	case <-ready:
		log.Info("dev stack ready", "gateway", stack.GatewayURL, "isolation", stack.Isolation)
		return stack, stop, nil
	case err := <-failed:
		stop()
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = stack.Close(cctx)
		return nil, nil, fmt.Errorf("dev worker: %w", err)
	}
}
