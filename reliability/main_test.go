package reliability

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/internal/syncbuf"
)

// The full-size runs, with the numbers of issue 8, take several minutes
// each; CI runs smaller versions that prove the same properties.
var fullFlag = flag.Bool("reliability.full", false, "run the reliability tests at full size (also: BOXQ_RELIABILITY_FULL=1)")

func full() bool { return *fullFlag || os.Getenv("BOXQ_RELIABILITY_FULL") == "1" }

// pick returns ci, or full in a full run.
func pick[T any](ci, fullSize T) T {
	if full() {
		return fullSize
	}
	return ci
}

func TestMain(m *testing.M) {
	// go-redis logs every failed dial of the test's own clients: noise
	// while Redis is down on purpose.
	redis.SetLogger(quietRedisLog{})
	// The tests spend their time waiting (for asynq's recoverer, for
	// outages to end), not computing: run more of them at once than the
	// default of one per CPU, unless -test.parallel says otherwise.
	flag.Parse()
	parallelSet := false
	flag.Visit(func(f *flag.Flag) { parallelSet = parallelSet || f.Name == "test.parallel" })
	if !parallelSet {
		_ = flag.Set("test.parallel", "6")
	}
	goleak.VerifyTestMain(runner{redistest.Wrap(m)},
		goleak.IgnoreTopFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).reaper"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

type quietRedisLog struct{}

func (quietRedisLog) Printf(context.Context, string, ...any) {}

// runner removes the binaries built for the tests once they have run.
type runner struct{ redistest.Runner }

func (r runner) Run() int {
	code := r.Runner.Run()
	bins.mu.Lock()
	if bins.dir != "" {
		os.RemoveAll(bins.dir)
	}
	bins.mu.Unlock()
	return code
}

// bins holds the programs built for the tests, once per test binary.
var bins struct {
	mu    sync.Mutex
	dir   string
	built map[string]error
}

// binary builds cmd/<name> (without -race: the processes only need to be
// real, and fast on a small machine) and returns its path.
func binary(t testing.TB, name string) string {
	t.Helper()
	bins.mu.Lock()
	defer bins.mu.Unlock()
	if bins.dir == "" {
		d, err := os.MkdirTemp("", "boxq-reliability-bin-")
		if err != nil {
			t.Fatal(err)
		}
		bins.dir, bins.built = d, map[string]error{}
	}
	path := filepath.Join(bins.dir, name)
	err, done := bins.built[name]
	if !done {
		cmd := exec.Command("go", "build", "-o", path, "github.com/boxq/boxq/cmd/"+name)
		cmd.Dir = ".."
		out, berr := cmd.CombinedOutput()
		if berr != nil {
			err = fmt.Errorf("go build cmd/%s: %v\n%s", name, berr, out)
		}
		bins.built[name] = err
	}
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// proc is a helper process: a worker, a gateway, an enqueue.
type proc struct {
	name    string
	started time.Time
	cmd     *exec.Cmd
	logs    *syncbuf.Buffer
	done    chan struct{} // closed when the process has exited
	err     error         // how it exited, once done is closed
}

// startProc starts a process whose output goes to a syncbuf.Buffer. It is
// killed, if still running, when the test ends; on failure its last log
// lines are shown.
func startProc(t testing.TB, name, path string, args, env []string) *proc {
	t.Helper()
	p := &proc{name: name, started: time.Now(), logs: &syncbuf.Buffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(path, args...)
	p.cmd.Env = env
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	// Dies with the test binary, whatever happens to it.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			lines := p.logs.Lines()
			t.Logf("last log lines of %s (pid %d, %v):\n%s", name, p.cmd.Process.Pid, p.err,
				strings.Join(lines[max(0, len(lines)-40):], "\n"))
		}
	})
	return p
}

// signal sends sig; it does nothing once the process has exited.
func (p *proc) signal(sig syscall.Signal) {
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Signal(sig)
	}
}

// kill kills the process and waits for it.
func (p *proc) kill() {
	p.signal(syscall.SIGKILL)
	<-p.done
}

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitExit waits up to d for the process to end on its own.
func (p *proc) waitExit(d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.done:
		return p.err
	case <-t.C:
		return fmt.Errorf("%s did not exit within %v", p.name, d)
	}
}

// waitLog waits until a log line contains every one of subs, or the
// process exits, or d passes.
func (p *proc) waitLog(d time.Duration, subs ...string) error {
	deadline := time.Now().Add(d)
	for {
		for _, l := range p.logs.Lines() {
			if containsAll(l, subs) {
				return nil
			}
		}
		if p.exited() {
			return fmt.Errorf("%s exited (%v) before logging %q", p.name, p.err, subs)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not log %q within %v", p.name, subs, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

// freeAddr returns a loopback address with a port free right now.
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// waitFor polls cond until it holds or d passes. It observes other
// processes (files, HTTP answers), never the test's own goroutines.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// scanLines splits text into lines (of any length), without the last
// line's newline.
func scanLines(b []byte) []string {
	s := strings.TrimSuffix(string(b), "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}
