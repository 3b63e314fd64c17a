package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/limits"
	"github.com/boxq/boxq/internal/app"
)

func TestMain(m *testing.M) {
	// run() names this test binary as the cgroup v1 shim's fallback (after
	// /bin/sh), as main does.
	if limits.RunShim(os.Args) {
		return
	}
	if os.Getenv(childEnv) != "" {
		// A test started this binary as the gateway itself, to run it as
		// another user (see startChild).
		main()
		return
	}
	goleak.VerifyTestMain(m)
}

// env is a getenv over a map.
func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestHelp(t *testing.T) {
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"-h"}, env(nil), &stdout, &stderr)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("run -h: got %v, want flag.ErrHelp", err)
	}
	for _, want := range []string{
		"gateway — serve", "Usage:", "-addr", "127.0.0.1:8085", "-token", "GATEWAY_TOKEN", "-state-dir",
		"-isolation", "-max-sandboxes", "(default 64)", "-output-limit", "(default 1048576)", "-log-format",
		"-log-level", "Examples:", "-start-wait", "(default 50ms)", "0: always answer running", "-max-running-execs",
		"-max-sandbox-running-execs", "-exec-retention", "-max-retained-execs", "-max-retained-bytes", "-sandbox-uid", "-sandbox-gid",
	} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("usage: want %q in it; got:\n%s", want, stdout.String())
		}
	}
	if stderr.Len() != 0 {
		t.Errorf("stderr: got %q, want nothing", stderr.String())
	}
}

func TestUsageErrors(t *testing.T) {
	withToken := map[string]string{"GATEWAY_TOKEN": "t"}
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"unknown flag", []string{"-nope"}, withToken, "flag provided but not defined: -nope"},
		{"bad number", []string{"-max-sandboxes", "many"}, withToken, "-max-sandboxes"},
		{"no token", nil, nil, "set GATEWAY_TOKEN"},
		{"empty token flag", []string{"-token", ""}, nil, "set GATEWAY_TOKEN"},
		{"bad isolation", []string{"-isolation", "docker"}, withToken, `-isolation "docker"`},
		{"zero max sandboxes", []string{"-max-sandboxes", "0"}, withToken, "-max-sandboxes 0"},
		{"zero output limit", []string{"-output-limit", "0"}, withToken, "-output-limit 0"},
		{"negative start wait", []string{"-start-wait", "-1s"}, withToken, "-start-wait -1s"},
		{"zero running execs", []string{"-max-running-execs", "0"}, withToken, "-max-running-execs 0"},
		{"zero retained execs", []string{"-max-retained-execs", "0"}, withToken, "-max-retained-execs 0"},
		{"root sandbox uid", []string{"-sandbox-uid", "0"}, withToken, "must not run as root"},
		{"bad log format", []string{"-log-format", "xml"}, withToken, `-log-format "xml"`},
		{"bad log level", []string{"-log-level", "loud"}, withToken, `-log-level "loud"`},
		{"arguments", []string{"serve"}, withToken, "unexpected arguments"},
		{"bad image fallback", []string{"-image-fallback", "none"}, withToken, `-image-fallback "none"`},
		{"negative max pids", []string{"-max-pids", "-1"}, withToken, "-max-pids -1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"-state-dir", t.TempDir()}, tt.args...)
			var stdout, stderr bytes.Buffer
			err := run(context.Background(), args, env(tt.env), &stdout, &stderr)
			if err == nil {
				t.Fatalf("run %q: got no error, want a usage error", tt.args)
			}
			// A usage error is exit status 2 (app.Exit).
			var ue *app.UsageError
			if !errors.As(err, &ue) {
				t.Errorf("run %q: got %T %v, want a usage error", tt.args, err, err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("run %q: got %q, want it to hold %q", tt.args, err, tt.want)
			}
		})
	}
}

func TestDefaultStateDir(t *testing.T) {
	if got, want := defaultStateDir(env(map[string]string{"XDG_STATE_HOME": "/xdg"})), "/xdg/boxq/gateway"; got != want {
		t.Errorf("with XDG_STATE_HOME: got %q, want %q", got, want)
	}
	if got, want := defaultStateDir(env(nil)), filepath.Join(os.TempDir(), "boxq-gateway"); got != want {
		t.Errorf("without XDG_STATE_HOME: got %q, want %q", got, want)
	}
}

func TestListenError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	args := []string{"-addr", ln.Addr().String(), "-state-dir", t.TempDir(), "-isolation", "none"}
	var stderr bytes.Buffer
	err = run(context.Background(), args, env(map[string]string{"GATEWAY_TOKEN": "t"}), io.Discard, &stderr)
	if err == nil || !strings.Contains(err.Error(), "listen") {
		t.Fatalf("run on a port in use: got %v, want a listen error", err)
	}
	if ue := (*app.UsageError)(nil); errors.As(err, &ue) {
		t.Errorf("got a usage error, want a plain one (exit status 1)")
	}
}

// logLines collects the JSON log lines of a running gateway and finds the
// address it listens on.
type logLines struct {
	mu    sync.Mutex
	lines []string
	addr  chan string
	done  chan struct{}
}

func readLogs(r io.Reader) *logLines {
	l := &logLines{addr: make(chan string, 1), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			l.mu.Lock()
			l.lines = append(l.lines, sc.Text())
			l.mu.Unlock()
			var rec struct{ Msg, Addr string }
			if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Msg == "listening" {
				l.addr <- rec.Addr
			}
		}
		_, _ = io.Copy(io.Discard, r)
	}()
	return l
}

func (l *logLines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

func TestServeAndShutdown(t *testing.T) {
	token := "tok-cmd-test-secret"
	pr, pw := io.Pipe()
	logs := readLogs(pr)
	defer func() { <-logs.done }() // after cancel, below, has ended run
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	args := []string{"-addr", "127.0.0.1:0", "-state-dir", t.TempDir(), "-isolation", "none", "-log-format", "json", "-log-level", "debug"}
	ran := make(chan error, 1)
	go func() {
		ran <- run(ctx, args, env(map[string]string{"GATEWAY_TOKEN": token}), io.Discard, pw)
		pw.Close()
	}()

	var addr string
	select {
	case addr = <-logs.addr:
	case err := <-ran:
		t.Fatalf("run ended before listening: %v\nlogs:\n%s", err, logs)
	case <-time.After(10 * time.Second):
		t.Fatalf("no listening log after 10s; logs:\n%s", logs)
	}
	base := "http://" + addr
	client := &http.Client{Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()

	call := func(method, path, body string) (int, []byte) {
		t.Helper()
		req, err := http.NewRequest(method, base+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, data
	}

	resp, err := client.Get(base + "/healthz")
	if err != nil {
		t.Fatalf("healthz: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("healthz: got %d, want 200", resp.StatusCode)
	}

	status, body := call("POST", "/v1/sandboxes", `{"logicalKey":"cmd-test"}`)
	var created gateway.CreateResponse
	if err := json.Unmarshal(body, &created); status != http.StatusOK || err != nil {
		t.Fatalf("create: got %d %s", status, body)
	}
	status, body = call("POST", "/v1/sandboxes/"+created.ID+"/execs", `{"execId":"e1","command":"echo hi","timeoutMs":10000}`)
	var st gateway.ExecState
	if err := json.Unmarshal(body, &st); status != http.StatusOK || err != nil {
		t.Fatalf("start: got %d %s", status, body)
	}
	if st.Status == gateway.StatusRunning {
		_, body = call("GET", "/v1/sandboxes/"+created.ID+"/execs/e1?waitMs=10000", "")
		_ = json.Unmarshal(body, &st)
	}
	if st.Status != gateway.StatusCompleted || st.Output != "hi\n" {
		t.Errorf("exec: got %s %q, want completed \"hi\\n\"", st.Status, st.Output)
	}

	// An exec still running at shutdown is killed.
	marker := fmt.Sprintf("boxq-cmd-marker-%d", time.Now().UnixNano())
	status, body = call("POST", "/v1/sandboxes/"+created.ID+"/execs",
		fmt.Sprintf(`{"execId":"e2","command":"(exec -a %s sleep 30) & wait","timeoutMs":60000}`, marker))
	if status != http.StatusOK {
		t.Fatalf("start: got %d %s", status, body)
	}
	waitFor(t, 5*time.Second, "marker process running", func() bool { return markerRunning(marker) })

	cancel()
	select {
	case err := <-ran:
		if err != nil {
			t.Errorf("run after cancel: got %v, want nil", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("run still running 20s after cancel")
	}
	waitFor(t, 5*time.Second, "marker process gone", func() bool { return !markerRunning(marker) })
	<-logs.done
	all := logs.String()
	if strings.Contains(all, token) {
		t.Errorf("the token appears in the logs")
	}
	for _, want := range []string{`"msg":"shutting down"`, `"msg":"stopped"`, `"sandbox_id":"` + created.ID + `"`} {
		if !strings.Contains(all, want) {
			t.Errorf("logs: want %s in them; got:\n%s", want, all)
		}
	}
}

// markerRunning reports whether a live process has marker in its command line.
func markerRunning(marker string) bool {
	matches, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, m := range matches {
		data, err := os.ReadFile(m)
		if err == nil && bytes.Contains(data, []byte(marker)) {
			return true
		}
	}
	return false
}

// waitFor checks cond until it holds, for at most within.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not so after %v", what, within)
		}
		<-tick.C
	}
}
