package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/internal/syncbuf"
)

func noenv(string) string { return "" }

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"unknown flag", []string{"-nope"}, "not defined"},
		{"argument", []string{"extra"}, "unexpected argument"},
		{"concurrency", []string{"-concurrency", "0"}, "-concurrency must be at least 1"},
		{"idle ttl", []string{"-idle-ttl", "0s"}, "-idle-ttl must be positive"},
		{"no gateway", []string{"-redis", "redis://127.0.0.1:1/0"}, "no gateway"},
		{"no token", []string{"-gateway", "http://127.0.0.1:1"}, "no gateway token"},
		{"log level", []string{"-log-level", "loud"}, "-log-level"},
		{"queues weight", []string{"-queues", "default=x"}, "weight must be a whole number"},
		{"queues zero", []string{"-queues", "default=0"}, "weight must be a whole number"},
		{"queues empty", []string{"-queues", ","}, "no queue"},
		{"queues twice", []string{"-queues", "a=1,a=2"}, "listed twice"},
		{"queues maintenance", []string{"-queues", "boxq=1"}, "boxq's own queue"},
		{"metrics auth without token", []string{"-metrics-auth"}, "-metrics-auth needs BOXQ_HTTP_TOKEN"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := run(context.Background(), tt.args, noenv, io.Discard, io.Discard)
			var ue *app.UsageError
			if !errors.As(err, &ue) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("run(%q) = %v, want a usage error containing %q", tt.args, err, tt.want)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"-h"}, noenv, &out, io.Discard); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("run -h = %v", err)
	}
	for _, want := range []string{"worker —", "GATEWAY_TOKEN", "-idle-ttl", "Examples:", "-queues", "BOXQ_HTTP_TOKEN", "-metrics-auth", "default=3,batch=1"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("help lacks %q", want)
		}
	}
}

func TestUnreachableRedisFailsFast(t *testing.T) {
	env := map[string]string{"GATEWAY_URL": "http://127.0.0.1:1", "GATEWAY_TOKEN": "t", "REDIS_URL": "redis://127.0.0.1:1/0"}
	err := run(context.Background(), nil, func(k string) string { return env[k] }, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "cannot reach Redis") {
		t.Errorf("run = %v, want a clear Redis error", err)
	}
}

func TestDevServesAndStops(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	const token = "s3cret-token"
	env := func(k string) string {
		if k == app.EnvHTTPToken {
			return token
		}
		return ""
	}
	var logs syncbuf.Buffer
	go func() {
		done <- run(ctx, []string{"-dev", "-http", addr, "-metrics-auth", "-log-format", "json", "-shutdown-timeout", "1s"}, env, io.Discard, &logs)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("worker -dev did not serve /healthz within 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The dashboard and (with -metrics-auth) the metrics need the token,
	// as a bearer token or as the password of Basic auth; the health
	// checks do not.
	auths := map[string]func(*http.Request){
		"none":         func(*http.Request) {},
		"bearer":       func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+token) },
		"basic":        func(r *http.Request) { r.SetBasicAuth("admin", token) },
		"wrong bearer": func(r *http.Request) { r.Header.Set("Authorization", "Bearer nope") },
		"wrong basic":  func(r *http.Request) { r.SetBasicAuth(token, "nope") },
	}
	for _, tt := range []struct {
		path, auth, want string
		code             int
	}{
		{"/monitoring/", "none", "", http.StatusUnauthorized},
		{"/monitoring/", "wrong bearer", "", http.StatusUnauthorized},
		{"/monitoring/", "wrong basic", "", http.StatusUnauthorized},
		{"/monitoring/", "bearer", "<html", http.StatusOK},
		{"/monitoring/", "basic", "<html", http.StatusOK},
		{"/monitoring/api/queues", "none", "", http.StatusUnauthorized},
		{"/monitoring/api/queues", "basic", "queues", http.StatusOK},
		{"/metrics", "none", "", http.StatusUnauthorized},
		{"/metrics", "bearer", "boxq_waits_total", http.StatusOK},
		{"/healthz", "none", `"ok"`, http.StatusOK},
		{"/readyz", "none", `"ok"`, http.StatusOK},
	} {
		req, err := http.NewRequest(http.MethodGet, "http://"+addr+tt.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		auths[tt.auth](req)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.code || !strings.Contains(string(body), tt.want) {
			t.Errorf("GET %s (auth %s) = %d %.200q; want %d with %q", tt.path, tt.auth, resp.StatusCode, body, tt.code, tt.want)
		}
		if tt.code == http.StatusUnauthorized && !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic") {
			t.Errorf("GET %s (auth %s): no Basic challenge, so a browser would not ask", tt.path, tt.auth)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run returned %v after cancel, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("worker did not stop within 30s of cancel")
	}
	// JSON logs write durations as Go durations, not nanoseconds.
	if !strings.Contains(logs.String(), `"idle_ttl":"5m0s"`) {
		t.Errorf("the JSON log lacks \"idle_ttl\":\"5m0s\":\n%s", logs.String())
	}
	if strings.Contains(logs.String(), token) {
		t.Error("the token appears in the log")
	}
}
