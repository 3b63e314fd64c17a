package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

// WorkerOptions are the worker's settings, as its flags give them.
type WorkerOptions struct {
	RedisURL          string
	GatewayURL, Token string
	Concurrency       int
	IdleTTL           time.Duration
	SandboxLifetime   time.Duration
	ReapEvery         time.Duration
	MaxSandboxes      int
	TaskCheckInterval time.Duration
	ShutdownTimeout   time.Duration
	Queues            map[string]int
	// HTTPAddr serves /metrics, /healthz, /readyz and /monitoring/ ("" =
	// none).
	HTTPAddr string
	// HTTPToken guards /monitoring/ (a bearer token, or the password of
	// HTTP Basic auth); "" serves no dashboard. MetricsAuth guards
	// /metrics with it too.
	HTTPToken   string
	MetricsAuth bool
	Logger      *slog.Logger
	// OnReady, when set, is called once the worker serves, with the
	// address the HTTP endpoints listen on ("" without HTTPAddr).
	OnReady func(httpAddr string)
}

// ConnectRedis opens a client for url and checks that Redis answers.
// poolSize 0 keeps go-redis's default.
func ConnectRedis(ctx context.Context, url string, poolSize int) (*redis.Client, error) {
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("redis URL %q: %w (want redis://host:port/db)", RedactURL(url), err)
	}
	if poolSize > 0 {
		opt.PoolSize = poolSize
	}
	rdb := redis.NewClient(opt)
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := rdb.Ping(pctx).Err(); err != nil {
		rdb.Close()
		return nil, fmt.Errorf("cannot reach Redis at %s: %w (is redis-server running? set -redis or REDIS_URL)", opt.Addr, err)
	}
	return rdb, nil
}

// RunWorker runs a worker until ctx ends. It fails fast, with a message
// that says what to fix, when Redis or the gateway cannot be reached or the
// gateway rejects the token.
func RunWorker(ctx context.Context, o WorkerOptions) error {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	concurrency := o.Concurrency
	if concurrency == 0 {
		concurrency = 256
	}
	// Each job makes a few short Redis calls and holds no connection while
	// it waits on the gateway, so a fraction of the concurrency suffices.
	rdb, err := ConnectRedis(ctx, o.RedisURL, max(32, concurrency/4))
	if err != nil {
		return err
	}
	defer rdb.Close()

	gw, err := gateway.New(gateway.Config{BaseURL: o.GatewayURL, Token: o.Token, Logger: log.With("component", "gateway")})
	if err != nil {
		return err
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = gw.Ping(pctx)
	cancel()
	if err != nil {
		return fmt.Errorf("gateway at %s is not usable: %w", RedactURL(o.GatewayURL), err)
	}

	pool, err := sandboxpool.New(rdb, gw, sandboxpool.Config{MaxSandboxes: o.MaxSandboxes, Logger: log.With("component", "pool")})
	if err != nil {
		return err
	}

	// Records made by an older boxq, before the fan-out index existed, join
	// it (once per Redis: later starts cost one command).
	if n, err := pool.Index().Backfill(ctx); err != nil {
		log.Warn("backfill the fan-out index of task ids", "err", err)
	} else if n > 0 {
		log.Info("added existing sandboxes to the fan-out index", "count", n)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	insp := asynq.NewInspectorFromRedisClient(rdb)
	metrics, err := jobs.NewMetrics(reg, pool.Created, insp)
	if err != nil {
		return fmt.Errorf("register metrics: %w", err)
	}

	w, err := jobs.NewWorker(jobs.WorkerConfig{
		Redis: rdb, Gateway: gw, Pool: pool,
		Concurrency: concurrency, Queues: o.Queues,
		TaskCheckInterval: o.TaskCheckInterval, ShutdownTimeout: o.ShutdownTimeout,
		IdleTTL: o.IdleTTL, ReapEvery: o.ReapEvery, SandboxLifetime: o.SandboxLifetime,
		Logger: log, Metrics: metrics,
	})
	if err != nil {
		return err
	}

	httpAddr := ""
	var httpSrv *http.Server
	served := make(chan error, 1)
	if o.HTTPAddr != "" {
		ln, err := net.Listen("tcp", o.HTTPAddr)
		if err != nil {
			return fmt.Errorf("-http %s: %w", o.HTTPAddr, err)
		}
		httpAddr = ln.Addr().String()
		h := httpHandler(httpConfig{rdb: rdb, reg: reg, gw: gw, token: o.HTTPToken, metricsAuth: o.MetricsAuth, log: log})
		httpSrv = &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
		go func() { served <- httpSrv.Serve(ln) }()
		if o.HTTPToken == "" {
			log.Warn("no " + EnvHTTPToken + ": the dashboard (/monitoring/) is not served; set it to log in with it")
		}
		log.Info("serving metrics, health and dashboard", "addr", httpAddr,
			"metrics", "http://"+httpAddr+"/metrics", "dashboard", "http://"+httpAddr+"/monitoring/", "metrics_auth", o.MetricsAuth)
	}
	log.Info("worker started", "concurrency", concurrency, "queues", FormatQueues(o.Queues), "gateway", RedactURL(o.GatewayURL), "idle_ttl", o.IdleTTL)
	if o.OnReady != nil {
		o.OnReady(httpAddr)
	}
	err = w.Run(ctx)
	if httpSrv != nil {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_ = httpSrv.Shutdown(sctx)
		cancel()
		if serr := <-served; !errors.Is(serr, http.ErrServerClosed) {
			err = errors.Join(err, serr)
		}
	}
	log.Info("worker stopped")
	return err
}
