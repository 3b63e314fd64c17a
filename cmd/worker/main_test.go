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
	for _, want := range []string{"worker —", "GATEWAY_TOKEN", "-idle-ttl", "Examples:"} {
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
	go func() {
		done <- run(ctx, []string{"-dev", "-http", addr, "-log-format", "json", "-shutdown-timeout", "1s"}, noenv, io.Discard, io.Discard)
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
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "boxq_results_total") {
		t.Errorf("/metrics lacks boxq_results_total")
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
}
