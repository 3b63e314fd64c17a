// Package redistest gives tests a real Redis.
//
// One redis-server is started lazily per test binary, on a free port of
// 127.0.0.1, with persistence off and 4096 databases; every New hands out a
// fresh, flushed database of it, so tests are isolated even when the code
// under test uses unprefixed keys (asynq does). TEST_REDIS_URL points the
// tests at an existing server instead.
//
// When redis-server is not installed and TEST_REDIS_URL is unset, the tests
// run against an in-process miniredis, so `go test ./...` passes on a machine
// with only Go; BOXQ_REQUIRE_REDIS=1 (set by CI) turns that into a failure.
//
// Use it from TestMain so the shared server is stopped when the tests end:
//
//	func TestMain(m *testing.M) { redistest.Main(m) }
//
// or, with goleak:
//
//	func TestMain(m *testing.M) { goleak.VerifyTestMain(redistest.Wrap(m)) }
package redistest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// Environment variables read by this package.
const (
	// EnvURL names an existing server to use instead of starting one.
	// Give that server many databases (--databases 4096): test binaries
	// of several packages share it and each New takes a database.
	EnvURL = "TEST_REDIS_URL"
	// EnvRequire, set to 1, makes a missing redis-server a test failure
	// instead of a fallback to miniredis.
	EnvRequire = "BOXQ_REQUIRE_REDIS"
)

const (
	databases    = 4096
	startTimeout = 10 * time.Second
	stopTimeout  = 10 * time.Second
	// nextDBKey, in database 0 of a TEST_REDIS_URL server, hands out
	// database numbers across the test binaries that share that server.
	nextDBKey = "redistest:nextdb"
)

// shared is the server of this test binary. It is package state by
// necessity: "one server per test binary" outlives any single test.
var shared struct {
	once sync.Once
	srv  *Srv
	err  error
}

// Main runs the tests, stops the shared server and exits with the tests'
// status. Call it from TestMain.
func Main(m *testing.M) {
	os.Exit(Wrap(m).Run())
}

// Runner runs a test binary's tests and then stops the shared server.
// It satisfies goleak.TestingM, so goleak checks for leaks after the
// server's goroutines are gone.
type Runner struct{ m *testing.M }

// Wrap returns a Runner for m: goleak.VerifyTestMain(redistest.Wrap(m)).
func Wrap(m *testing.M) Runner { return Runner{m: m} }

// Run runs the tests, then stops the shared server.
func (r Runner) Run() int {
	code := r.m.Run()
	if shared.srv != nil {
		if err := shared.srv.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "redistest:", err)
		}
		if shared.srv.ownDir {
			os.RemoveAll(shared.srv.dir)
		}
	}
	return code
}

// New returns a client on a fresh, empty database of the shared server and
// the URL of that database (redis://127.0.0.1:PORT/17). The client is
// closed and the database flushed when the test ends.
func New(tb testing.TB) (*redis.Client, string) {
	tb.Helper()
	return Server(tb).New(tb)
}

// Server returns the shared server of this test binary, starting it on
// first use. Do not stop or restart it: other tests use it; use
// StartServer for that.
func Server(tb testing.TB) *Srv {
	tb.Helper()
	shared.once.Do(func() {
		shared.srv, shared.err = startShared(tb)
	})
	if shared.err != nil {
		tb.Fatal(shared.err)
	}
	return shared.srv
}

// StartServer starts a dedicated redis-server for one test, with args
// appended to the defaults (later arguments win, so "--appendonly", "yes"
// turns persistence on). It is stopped when the test ends. Without
// redis-server (and without BOXQ_REQUIRE_REDIS=1) it is a miniredis, which
// ignores args but keeps its data across Restart.
func StartServer(tb testing.TB, args ...string) *Srv {
	tb.Helper()
	path, err := exec.LookPath("redis-server")
	var s *Srv
	switch {
	case err == nil:
		s = &Srv{bin: path, args: args, dir: tb.TempDir()}
		err = s.start()
	case os.Getenv(EnvRequire) == "1":
		err = errNotFound
	default:
		if len(args) > 0 {
			tb.Logf("redistest: miniredis ignores the server arguments %q", args)
		}
		s, err = startMini()
	}
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := s.Stop(); err != nil {
			tb.Error(err)
		}
	})
	return s
}

var errNotFound = errors.New("redistest: redis-server not found: install it (apt-get install -y redis-server) or set " + EnvURL)

func startShared(tb testing.TB) (*Srv, error) {
	if raw := os.Getenv(EnvURL); raw != "" {
		return external(raw)
	}
	path, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv(EnvRequire) == "1" {
			return nil, errNotFound
		}
		tb.Logf("redistest: redis-server not found, using an in-process miniredis (set %s=1 to require a real server)", EnvRequire)
		return startMini()
	}
	dir, err := os.MkdirTemp("", "redistest-")
	if err != nil {
		return nil, fmt.Errorf("redistest: %w", err)
	}
	s := &Srv{bin: path, dir: dir, ownDir: true}
	if err := s.start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return s, nil
}

// startMini starts a miniredis whose keys expire in real time.
func startMini() (*Srv, error) {
	s := &Srv{mini: miniredis.NewMiniRedis()}
	if err := s.mini.Start(); err != nil {
		return nil, fmt.Errorf("redistest: start miniredis: %w", err)
	}
	s.startClock()
	return s, nil
}

// startClock advances miniredis's TTLs with the wall clock, as a real
// server's run: leases and asynq rely on keys expiring. (miniredis's own
// ClockTTL does it on every command by walking every key, far too slow with
// 100,000 keys; a ticker whose period grows with the walk's cost keeps the
// server responsive.)
func (s *Srv) startClock() {
	stop, done := make(chan struct{}), make(chan struct{})
	s.clockStop, s.clockDone = stop, done
	go func() {
		defer close(done)
		last := time.Now()
		t := time.NewTimer(minTick)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			now := time.Now()
			s.mini.FastForward(now.Sub(last))
			last = now
			t.Reset(max(minTick, 10*time.Since(now)))
		}
	}()
}

const minTick = 2 * time.Millisecond

func (s *Srv) stopClock() {
	if s.clockStop != nil {
		close(s.clockStop)
		<-s.clockDone
		s.clockStop, s.clockDone = nil, nil
	}
}

// Srv is a Redis server used by tests: a redis-server process of this
// package, a miniredis, or the server named by TEST_REDIS_URL.
type Srv struct {
	// A redis-server process.
	bin    string
	args   []string
	dir    string
	ownDir bool

	// The server of TEST_REDIS_URL.
	ext    *url.URL
	extDBs int64

	mini      *miniredis.Miniredis
	clockStop chan struct{} // guarded by mu
	clockDone chan struct{}

	nextDB sync.Mutex // guards db
	db     int64

	mu     sync.Mutex // guards the process fields
	addr   string
	cmd    *exec.Cmd
	exited chan struct{}
}

func external(raw string) (*Srv, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("redistest: %s: %w", EnvURL, err)
	}
	if _, err := redis.ParseURL(raw); err != nil {
		return nil, fmt.Errorf("redistest: %s: %w", EnvURL, err)
	}
	s := &Srv{ext: u, addr: u.Host, extDBs: 16}
	c := redis.NewClient(s.options(0))
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		return nil, fmt.Errorf("redistest: %s: %w", EnvURL, err)
	}
	// Servers that refuse CONFIG keep the default of 16 databases.
	if kv, err := c.ConfigGet(ctx, "databases").Result(); err == nil {
		if n, err := strconv.ParseInt(kv["databases"], 10, 64); err == nil && n > 1 {
			s.extDBs = n
		}
	}
	return s, nil
}

// Embedded reports whether s is the in-process miniredis fallback, which
// lacks some of redis-server's commands (CONFIG SET among them).
func (s *Srv) Embedded() bool { return s.mini != nil }

// Addr returns the server's host:port.
func (s *Srv) Addr() string {
	if s.mini != nil {
		return s.mini.Addr()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// URL returns the URL of database db of the server.
func (s *Srv) URL(db int) string {
	if s.ext != nil {
		u := *s.ext
		u.Path = "/" + strconv.Itoa(db)
		return u.String()
	}
	return "redis://" + s.Addr() + "/" + strconv.Itoa(db)
}

func (s *Srv) options(db int) *redis.Options {
	opt, err := redis.ParseURL(s.URL(db))
	if err != nil {
		// URL builds what ParseURL reads; external checked the rest.
		panic(err)
	}
	return opt
}

// New returns a client on a fresh, empty database of s and that database's
// URL. The client is closed and the database flushed when the test ends.
func (s *Srv) New(tb testing.TB) (*redis.Client, string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	db, err := s.allocDB(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	c := redis.NewClient(s.options(db))
	if err := c.FlushDB(ctx).Err(); err != nil {
		c.Close()
		tb.Fatalf("redistest: flush database %d: %v", db, err)
	}
	tb.Cleanup(func() {
		// Flush so that a binary with many tests does not hold every
		// test's data until it exits. A stopped server is no error.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c.FlushDB(ctx)
		c.Close()
	})
	return c, s.URL(db)
}

// allocDB returns the next database number, never 0 (which holds the
// counter on a shared external server).
func (s *Srv) allocDB(ctx context.Context) (int, error) {
	if s.ext != nil {
		c := redis.NewClient(s.options(0))
		defer c.Close()
		n, err := c.Incr(ctx, nextDBKey).Result()
		if err != nil {
			return 0, fmt.Errorf("redistest: allocate a database: %w", err)
		}
		return int(1 + (n-1)%(s.extDBs-1)), nil
	}
	s.nextDB.Lock()
	defer s.nextDB.Unlock()
	s.db = s.db%(databases-1) + 1
	return int(s.db), nil
}

// start starts the redis-server process, on a new free port the first time
// and on the same port (and directory, so persisted data comes back) after.
func (s *Srv) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	keepPort := s.addr != ""
	var err error
	// A free port can be taken between our probe and redis binding it:
	// try a few.
	for range 5 {
		if !keepPort {
			if s.addr, err = freeAddr(); err != nil {
				return err
			}
		}
		if err = s.startOnce(); err == nil || keepPort {
			return err
		}
	}
	return err
}

func (s *Srv) startOnce() error {
	_, port, _ := net.SplitHostPort(s.addr)
	args := append([]string{
		"--port", port, "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no",
		"--databases", strconv.Itoa(databases),
		"--dir", s.dir, "--logfile", "",
	}, s.args...)
	logPath := s.dir + "/redis.log"
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("redistest: %w", err)
	}
	defer logFile.Close()
	cmd := exec.Command(s.bin, args...)
	cmd.Dir = s.dir
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("redistest: start redis-server: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	if err := waitReady(s.addr, exited); err != nil {
		cmd.Process.Kill()
		<-exited
		return fmt.Errorf("redistest: redis-server on %s: %w\n%s", s.addr, err, tail(logPath))
	}
	s.cmd, s.exited = cmd, exited
	return nil
}

// waitReady polls PING until the server answers PONG (not LOADING), the
// process exits or startTimeout passes.
func waitReady(addr string, exited <-chan struct{}) error {
	deadline := time.NewTimer(startTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if ping(addr) == nil {
			return nil
		}
		select {
		case <-exited:
			return errors.New("exited during start")
		case <-deadline.C:
			return fmt.Errorf("not ready after %v: %w", startTimeout, ping(addr))
		case <-tick.C:
		}
	}
}

func ping(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("PING: %q", line)
	}
	return nil
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("redistest: find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// Stop shuts the server down (SIGTERM, so an AOF is flushed; SIGKILL if it
// does not exit in time). Stopping a stopped server does nothing.
func (s *Srv) Stop() error {
	return s.halt(syscall.SIGTERM)
}

// Kill kills the server at once (SIGKILL), as a crash would.
func (s *Srv) Kill() error {
	return s.halt(syscall.SIGKILL)
}

func (s *Srv) halt(sig syscall.Signal) error {
	if s.mini != nil {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.stopClock()
		s.mini.Close()
		return nil
	}
	if s.ext != nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return nil
	}
	cmd, exited := s.cmd, s.exited
	s.cmd, s.exited = nil, nil
	cmd.Process.Signal(sig)
	t := time.NewTimer(stopTimeout)
	defer t.Stop()
	select {
	case <-exited:
		return nil
	case <-t.C:
		cmd.Process.Kill()
		<-exited
		return fmt.Errorf("redistest: redis-server on %s ignored %v for %v; killed", s.addr, sig, stopTimeout)
	}
}

// Restart stops the server and starts it again on the same address, with
// the same directory and arguments. Clients reconnect on their own.
func (s *Srv) Restart() error {
	if s.ext != nil {
		return fmt.Errorf("redistest: cannot restart the server of %s", EnvURL)
	}
	if err := s.Stop(); err != nil {
		return err
	}
	if s.mini != nil {
		s.mu.Lock()
		defer s.mu.Unlock()
		if err := s.mini.Restart(); err != nil {
			return fmt.Errorf("redistest: restart miniredis: %w", err)
		}
		s.startClock()
		return nil
	}
	return s.start()
}
