package app

import (
	"context"
	"crypto/subtle"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/hibiken/asynqmon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"
)

// EnvHTTPToken names the secret of the worker's HTTP endpoints.
const EnvHTTPToken = "BOXQ_HTTP_TOKEN"

// sharedRedis hands asynqmon the worker's own Redis client.
type sharedRedis struct{ c redis.UniversalClient }

func (s sharedRedis) MakeRedisClient() any { return s.c }

// pinger is the gateway check of /readyz.
type pinger interface {
	Ping(ctx context.Context) error
}

type httpConfig struct {
	rdb         redis.UniversalClient
	reg         *prometheus.Registry
	gw          pinger
	token       string
	metricsAuth bool
	log         *slog.Logger
}

// httpHandler serves the worker's endpoints: /healthz (Redis answers: the
// worker can take jobs), /readyz (Redis and the gateway answer: jobs can
// run), /metrics (with the token when metricsAuth), and the dashboard at
// /monitoring/, only with the token: it can delete and re-run jobs.
func httpHandler(c httpConfig) http.Handler {
	mux := http.NewServeMux()
	var metrics http.Handler = promhttp.HandlerFor(c.reg, promhttp.HandlerOpts{})
	if c.metricsAuth {
		metrics = requireToken(c.token, metrics)
	}
	mux.Handle("GET /metrics", metrics)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		checkHealth(w, r, map[string]func(context.Context) error{"redis": func(ctx context.Context) error { return c.rdb.Ping(ctx).Err() }})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		checkHealth(w, r, map[string]func(context.Context) error{
			"redis":   func(ctx context.Context) error { return c.rdb.Ping(ctx).Err() },
			"gateway": c.gw.Ping,
		})
	})
	if c.token == "" {
		mux.HandleFunc("/monitoring/", func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "the dashboard is off: start the worker with "+EnvHTTPToken+" set, and log in with it", http.StatusForbidden)
		})
	} else {
		mon := asynqmon.New(asynqmon.Options{RootPath: "/monitoring", RedisConnOpt: sharedRedis{c.rdb}})
		mux.Handle("/monitoring/", requireToken(c.token, mon))
	}
	mux.Handle("GET /{$}", http.RedirectHandler("/monitoring/", http.StatusFound))
	return mux
}

// checkHealth answers 200 {"status":"ok"} when every check passes, else
// 503 with the first failure.
func checkHealth(w http.ResponseWriter, r *http.Request, checks map[string]func(context.Context) error) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	w.Header().Set("Content-Type", "application/json")
	for _, name := range []string{"redis", "gateway"} {
		check, ok := checks[name]
		if !ok {
			continue
		}
		if err := check(ctx); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "{\"status\":\"unhealthy\",\"error\":%q}\n", name+": "+err.Error())
			return
		}
	}
	fmt.Fprintln(w, `{"status":"ok"}`)
}

// requireToken lets a request through when it carries token as a bearer
// token (scripts, curl) or as the password of HTTP Basic auth, any user
// name (a browser's login prompt); else 401, with a Basic challenge so
// that a browser asks.
func requireToken(token string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if token != "" && tokenOK(r, token) {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("WWW-Authenticate", `Basic realm="boxq", charset="UTF-8"`)
		http.Error(w, "unauthorized: send "+EnvHTTPToken+" as a bearer token, or as the password of Basic auth", http.StatusUnauthorized)
	})
}

func tokenOK(r *http.Request, token string) bool {
	got := ""
	if h := r.Header.Get("Authorization"); len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		got = strings.TrimSpace(h[7:])
	} else if _, pass, ok := r.BasicAuth(); ok {
		got = pass
	}
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(token)) == 1
}
