// Command worker serves boxq's exec, terminate and reap jobs: it borrows
// each task's sandbox from the pool, runs commands through the gateway and
// writes their results to Redis.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/internal/devstack"
	"github.com/boxq/boxq/jobs"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	app.Exit("worker", err, os.Stderr)
}

const helpHead = `worker — run boxq jobs: commands in per-task sandboxes, through a sandbox gateway.

Usage:
  worker [flags]

It takes exec jobs from Redis (enqueued by 'enqueue'), runs each in its
task's sandbox through the gateway, writes the result and the new cwd to
Redis, and terminates sandboxes idle for longer than -idle-ttl. Run as many
workers as you like against one Redis: they share the sandbox pool.

Environment:
  REDIS_URL        default for -redis (redis://127.0.0.1:6379/0)
  GATEWAY_URL      default for -gateway; fallbacks MODAL_GATEWAY_URL, then
                   ${TOOL_GATEWAY_SCHEME:-https}://modal-gateway.${TOOL_GATEWAY_DOMAIN}
  GATEWAY_TOKEN    default for -token; fallback TOOL_GATEWAY_USER_TOKEN
  BOXQ_HTTP_TOKEN  the secret of -http's dashboard (/monitoring/): send it as a
                   bearer token, or as the password of the browser's login
                   (any user name). Unset: no dashboard. -metrics-auth guards
                   /metrics with it too. /healthz and /readyz are open.

Queues: -queues 'default=3,batch=1' serves two queues, default tried first
three times as often as batch (asynq's weighted priority). boxq's own queue
"boxq" (terminate and reap jobs) is served by every worker whatever -queues
says, so workers of any queues terminate and reap.
`

const helpTail = `
Examples:
  # everything embedded (Redis and a reference gateway), for a try-out:
  worker -dev -http 127.0.0.1:9090
  # production: Redis and a gateway elsewhere, metrics and dashboard on :9090
  REDIS_URL=redis://redis:6379/0 GATEWAY_URL=https://gw.example.com GATEWAY_TOKEN=… worker -http :9090
  # a small worker that reaps more eagerly
  worker -concurrency 32 -idle-ttl 2m -reap-every 10s
  # a worker for two queues, default first three times as often
  worker -queues 'default=3,batch=1'
`

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	envURL, envToken := gateway.FromEnv(getenv)
	redisURL := fs.String("redis", app.EnvOr(getenv, "REDIS_URL", "redis://127.0.0.1:6379/0"), "Redis `URL` (env REDIS_URL)")
	gatewayURL := fs.String("gateway", envURL, "sandbox gateway `URL` (env GATEWAY_URL)")
	token := fs.String("token", "", "gateway bearer `token` (env GATEWAY_TOKEN; prefer the env: flags show in ps)")
	concurrency := fs.Int("concurrency", 256, "jobs run at once; jobs mostly wait on the gateway, so this can be high")
	idleTTL := fs.Duration("idle-ttl", 5*time.Minute, "terminate sandboxes unused for this long")
	lifetime := fs.Duration("sandbox-lifetime", time.Hour, "lifetime asked of the gateway for new sandboxes; a persistent sandbox is rotated between commands before a command's timeout would outlast it")
	reapEvery := fs.Duration("reap-every", 30*time.Second, "how often idle sandboxes are looked for (one reap per tick across all workers)")
	httpAddr := fs.String("http", "", "serve /metrics, /healthz, /readyz and the dashboard at /monitoring/ on this `address` (e.g. :9090); the dashboard needs BOXQ_HTTP_TOKEN")
	metricsAuth := fs.Bool("metrics-auth", false, "with -http: /metrics needs BOXQ_HTTP_TOKEN too (bearer or Basic password)")
	queues := fs.String("queues", "default=1", "asynq `queues` to serve with their weights, as in 'default=3,batch=1'")
	dev := fs.Bool("dev", false, "embedded Redis and reference gateway: no Redis or gateway needed")
	maxSandboxes := fs.Int("max-sandboxes", 0, "cap on live sandboxes across all workers (0: no cap)")
	pollInterval := fs.Duration("poll-interval", jobs.DefaultTaskCheckInterval, "how long an idle worker waits for a wake-up before it checks Redis for jobs anyway (enqueues wake it at once): the pickup of jobs made runnable without a wake-up vs idle Redis load")
	shutdownTimeout := fs.Duration("shutdown-timeout", 25*time.Second, "on SIGTERM, how long running jobs may finish; the rest are re-attached by another worker")
	logFormat := fs.String("log-format", "auto", "log format: auto (text on a terminal, else json), text or json")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn or error")
	if err := app.ParseFlags(fs, args, stdout, helpHead, helpTail); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return app.Usagef("unexpected argument %q: worker takes flags only", fs.Arg(0))
	}
	if *token == "" {
		*token = envToken
	}
	switch {
	case *concurrency < 1:
		return app.Usagef("-concurrency must be at least 1")
	case *idleTTL <= 0:
		return app.Usagef("-idle-ttl must be positive")
	case *lifetime <= 0:
		return app.Usagef("-sandbox-lifetime must be positive")
	case *reapEvery <= 0:
		return app.Usagef("-reap-every must be positive")
	case *pollInterval <= 0:
		return app.Usagef("-poll-interval must be positive")
	case *maxSandboxes < 0:
		return app.Usagef("-max-sandboxes must not be negative")
	}
	qs, err := app.ParseQueues(*queues)
	if err != nil {
		return app.Usagef("%v", err)
	}
	httpToken := getenv(app.EnvHTTPToken)
	if *metricsAuth && httpToken == "" {
		return app.Usagef("-metrics-auth needs %s set", app.EnvHTTPToken)
	}
	log, err := app.NewLogger(stderr, *logFormat, *logLevel)
	if err != nil {
		return app.Usagef("%v", err)
	}
	app.RouteRedisLogs(log)
	if *dev {
		stack, err := devstack.Start(log, local.IsolationAuto)
		if err != nil {
			return err
		}
		defer func() {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			_ = stack.Close(cctx)
		}()
		*redisURL, *gatewayURL, *token = stack.RedisURL, stack.GatewayURL, stack.Token
		fmt.Fprintf(stderr, "dev mode: embedded Redis at %s, embedded gateway (isolation %s).\n"+
			"Enqueue from another terminal with: go run ./cmd/enqueue -redis %s -task demo -wait -- echo hello\n",
			stack.RedisURL, stack.Isolation, stack.RedisURL)
	}
	if *gatewayURL == "" {
		return app.Usagef("no gateway: set -gateway or GATEWAY_URL (or use -dev)")
	}
	if *token == "" {
		return app.Usagef("no gateway token: set GATEWAY_TOKEN (or -token)")
	}
	return app.RunWorker(ctx, app.WorkerOptions{
		RedisURL: *redisURL, GatewayURL: *gatewayURL, Token: *token,
		Concurrency: *concurrency, IdleTTL: *idleTTL, ReapEvery: *reapEvery, SandboxLifetime: *lifetime,
		MaxSandboxes: *maxSandboxes, TaskCheckInterval: *pollInterval, ShutdownTimeout: *shutdownTimeout,
		Queues: qs, HTTPAddr: *httpAddr, HTTPToken: httpToken, MetricsAuth: *metricsAuth, Logger: log,
	})
}
