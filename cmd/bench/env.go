package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/sandboxpool"
)

// env is what every measurement shares: one redis-server (a database per
// measurement) and two reference gateways served over loopback HTTP.
type env struct {
	opts  *options
	log   io.Writer // progress lines
	redis *redisServer
	token string
	// gw answers fast execs in the start call (StartWait, the reference
	// gateway's default); gwNoWait answers every start at once with
	// "running", as a gateway without that feature does.
	gw, gwNoWait *gatewayServer

	mu         sync.Mutex
	nextDB     int
	transports []*http.Transport // of the gateway clients, closed at the end
}

// gatewayServer is a reference gateway served over loopback HTTP.
type gatewayServer struct {
	srv    *local.Server
	http   *http.Server
	url    string
	served chan error
}

func startGateway(cfg local.Config) (*gatewayServer, error) {
	srv, err := local.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("start reference gateway: %w", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		_ = srv.Close(context.Background())
		return nil, err
	}
	g := &gatewayServer{
		srv:    srv,
		http:   &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second},
		url:    "http://" + ln.Addr().String(),
		served: make(chan error, 1),
	}
	go func() { g.served <- g.http.Serve(ln) }()
	return g, nil
}

func (g *gatewayServer) close(ctx context.Context) error {
	err := g.http.Shutdown(ctx)
	if serr := <-g.served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return errors.Join(err, g.srv.Close(ctx))
}

// newEnv starts Redis and the gateways.
func newEnv(ctx context.Context, o *options, progress io.Writer) (*env, error) {
	e := &env{opts: o, log: progress}
	var b [16]byte
	_, _ = rand.Read(b[:])
	e.token = hex.EncodeToString(b[:])
	var err error
	if e.redis, err = startRedis(ctx, o.redisServer); err != nil {
		return nil, err
	}
	cfg := local.Config{
		Token:     e.token,
		Isolation: local.Isolation(o.isolation),
		// Room for every sandbox of every measurement (the pipeline's,
		// the direct client's and the worker-memory run's thousand) and
		// for the thousand execs in flight.
		MaxSandboxes:           4 * o.inflight,
		MaxRunningExecs:        2 * o.inflight,
		MaxSandboxRunningExecs: 2 * o.inflight,
		Logger:                 slog.New(slog.DiscardHandler),
	}
	cfg.MaxSandboxes = max(cfg.MaxSandboxes, 4096)
	cfg.MaxRunningExecs = max(cfg.MaxRunningExecs, local.DefaultMaxRunningExecs)
	if e.gw, err = startGateway(cfg); err != nil {
		e.close()
		return nil, err
	}
	// What -start-wait 0 gives cmd/gateway: every start answered at once.
	cfg.StartWait = local.StartWaitFlag(0)
	if e.gwNoWait, err = startGateway(cfg); err != nil {
		e.close()
		return nil, err
	}
	return e, nil
}

func (e *env) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, t := range e.transports {
		t.CloseIdleConnections()
	}
	for _, g := range []*gatewayServer{e.gw, e.gwNoWait} {
		if g != nil {
			_ = g.close(ctx)
		}
	}
	if e.redis != nil {
		e.redis.stop()
	}
}

func (e *env) progress(format string, args ...any) {
	fmt.Fprintf(e.log, "bench: "+format+"\n", args...)
}

// db hands out a fresh Redis database number per measurement, so that no
// measurement sees another's keys.
func (e *env) db() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.nextDB = e.nextDB%15 + 1
	return e.nextDB
}

// client returns a gateway client of g, with a transport of its own (as
// a worker process has), whose connections close with the env.
func (e *env) client(g *gatewayServer) (*gateway.Client, error) {
	t := gateway.NewTransport()
	e.mu.Lock()
	e.transports = append(e.transports, t)
	e.mu.Unlock()
	return gateway.New(gateway.Config{BaseURL: g.url, Token: e.token, HTTPClient: &http.Client{Transport: t}})
}

// fullGateway is what a worker needs of a gateway: execs and sandboxes.
type fullGateway interface {
	jobs.Gateway
	sandboxpool.Gateway
}

// rig is an in-process worker on its own Redis database, and a producer
// with a Redis client of its own, as a separate process would have.
type rig struct {
	rdb, prdb *redis.Client
	pool      *sandboxpool.Pool
	prod      *jobs.Producer
	stop      func() error
}

// clients connects, on a fresh database, a worker's Redis client sized for
// concurrency (as internal/app sizes it) and a producer's.
func (e *env) clients(ctx context.Context, concurrency int) (worker, producer *redis.Client, err error) {
	db := e.db()
	worker, err = e.redis.client(ctx, db, max(32, concurrency/4))
	if err != nil {
		return nil, nil, err
	}
	producer, err = e.redis.client(ctx, db, 0)
	if err != nil {
		worker.Close()
		return nil, nil, err
	}
	return worker, producer, nil
}

// startRig starts a worker with concurrency over gw.
func (e *env) startRig(ctx context.Context, gw fullGateway, concurrency int, checkInterval time.Duration) (*rig, error) {
	rdb, prdb, err := e.clients(ctx, concurrency)
	if err != nil {
		return nil, err
	}
	r := &rig{rdb: rdb, prdb: prdb}
	fail := func(err error) (*rig, error) {
		rdb.Close()
		prdb.Close()
		return nil, err
	}
	if r.pool, err = sandboxpool.New(rdb, gw, sandboxpool.Config{}); err != nil {
		return fail(err)
	}
	if r.prod, err = jobs.NewProducer(prdb, jobs.ProducerConfig{}); err != nil {
		return fail(err)
	}
	// As cmd/worker runs: JSON logs at info level (here to nowhere) and
	// Prometheus metrics, so that their cost is measured too.
	metrics, err := jobs.NewMetrics(prometheus.NewRegistry(), r.pool.Live, nil)
	if err != nil {
		return fail(err)
	}
	w, err := jobs.NewWorker(jobs.WorkerConfig{
		Redis: rdb, Gateway: gw, Pool: r.pool,
		Concurrency:       concurrency,
		TaskCheckInterval: checkInterval,
		ShutdownTimeout:   5 * time.Second,
		ReapEvery:         -1,
		Logger:            slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelInfo})),
		Metrics:           metrics,
	})
	if err != nil {
		return fail(err)
	}
	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan error, 1)
	go func() { done <- w.Run(wctx) }()
	r.stop = func() error {
		cancel()
		err := <-done
		return errors.Join(err, rdb.Close(), prdb.Close())
	}
	return r, nil
}
