package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/internal/syncbuf"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(runner{m})
}

// runner runs the tests (stopping redistest's shared server), then removes
// the binaries built for them.
type runner struct{ m *testing.M }

func (r runner) Run() int {
	code := redistest.Wrap(r.m).Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	return code
}

// The programs under test.
const (
	progWorker  = "worker"
	progEnqueue = "enqueue"
	progGateway = "gateway"
	progAPI     = "api"
)

var programs = []string{progWorker, progEnqueue, progGateway, progAPI}

// built holds the programs, compiled once per test binary on first use. It
// is package state by necessity: it outlives any single test.
var built struct {
	once sync.Once
	dir  string
	err  error
}

// binaries returns the directory holding the freshly built programs. They
// are built with the race detector when the tests are, so that a data race
// in a program makes it exit 66 and the test fail.
func binaries(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		built.dir, built.err = build()
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.dir
}

func build() (string, error) {
	dir, err := os.MkdirTemp("", "boxq-e2e-bin-")
	if err != nil {
		return "", err
	}
	// The gateway's cgroup v1 shim, run as the sandbox user, is /bin/sh,
	// or its own binary where that user cannot run /bin/sh: keep the
	// binary runnable by it, as one installed in /usr/local/bin is.
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	args := []string{"build", "-o", dir + string(filepath.Separator)}
	if raceEnabled {
		args = append(args, "-race")
	}
	for _, p := range programs {
		args = append(args, "./cmd/"+p)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = repoRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return dir, nil
}

// repoRoot is the module's root, relative to this package's directory (the
// working directory of its tests).
const repoRoot = ".."

// proc is a program under test, running.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *syncbuf.Buffer // stdout and stderr, interleaved
	done chan struct{}
	err  error // of Wait, once done is closed
}

// start starts argv (argv[0] is a program of binaries) with the environment
// env added to a copy of this process's, less the variables the programs
// read, so that the caller's shell does not leak in. The process is killed
// when the test ends, if it is still running; its output is logged when the
// test failed.
func start(t *testing.T, name string, argv []string, env map[string]string) *proc {
	t.Helper()
	p := &proc{name: name, out: &syncbuf.Buffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(filepath.Join(binaries(t), argv[0]), argv[1:]...)
	p.cmd.Env = environ(env)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	// A group of its own: a kill at cleanup reaches everything it started.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	t.Logf("started %s (pid %d): %s", name, p.cmd.Process.Pid, strings.Join(argv, " "))
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
		if t.Failed() {
			t.Logf("output of %s:\n%s", name, p.out.String())
		}
	})
	return p
}

// stop sends SIGTERM and returns the exit code, failing the test when the
// process does not exit within limit.
func (p *proc) stop(t *testing.T, limit time.Duration) int {
	t.Helper()
	began := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		t.Errorf("SIGTERM %s: %v", p.name, err)
	}
	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case <-p.done:
	case <-timer.C:
		t.Fatalf("%s did not exit within %v of SIGTERM", p.name, limit)
	}
	t.Logf("%s exited %d, %v after SIGTERM", p.name, p.cmd.ProcessState.ExitCode(), time.Since(began).Round(time.Millisecond))
	return p.cmd.ProcessState.ExitCode()
}

// programEnv lists the variables the programs read: they come from the
// test only.
var programEnv = []string{
	"REDIS_URL", "GATEWAY_URL", "GATEWAY_TOKEN", "MODAL_GATEWAY_URL",
	"TOOL_GATEWAY_SCHEME", "TOOL_GATEWAY_DOMAIN", "TOOL_GATEWAY_USER_TOKEN",
}

func environ(env map[string]string) []string {
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		drop := false
		for _, p := range programEnv {
			drop = drop || k == p
		}
		if !drop {
			out = append(out, kv)
		}
	}
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	return out
}

// run runs argv to its end (or ctx's) and returns its stdout, its stderr and
// its exit code.
func run(ctx context.Context, t *testing.T, argv []string, env map[string]string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.CommandContext(ctx, filepath.Join(binaries(t), argv[0]), argv[1:]...)
	cmd.Env = environ(env)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("%s: %v\nstderr:\n%s", strings.Join(argv, " "), err, errb.String())
	}
	if ctx.Err() != nil {
		t.Fatalf("%s: %v\nstderr:\n%s", strings.Join(argv, " "), ctx.Err(), errb.String())
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// freeAddr returns a loopback address with a port that was free a moment
// ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// waitHealthy polls http://addr/healthz until it answers 200, failing the
// test when p exits first or limit passes.
func waitHealthy(t *testing.T, p *proc, addr string, limit time.Duration) {
	t.Helper()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		code, _, err := get(context.Background(), "http://"+addr+"/healthz")
		if err == nil && code == http.StatusOK {
			return
		}
		last = err
		if err == nil {
			last = fmt.Errorf("status %d", code)
		}
		select {
		case <-p.done:
			t.Fatalf("%s exited before it was healthy: %v\n%s", p.name, p.err, p.out.String())
		case <-deadline.C:
			t.Fatalf("%s not healthy on %s after %v: %v", p.name, addr, limit, last)
		case <-tick.C:
		}
	}
}

// get fetches url and returns the status and (up to 4 MiB of) the body.
func get(ctx context.Context, url string) (int, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	// No keep-alive: nothing is left open once the process under test
	// stops.
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	return resp.StatusCode, string(b), err
}
