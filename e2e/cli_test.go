package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
)

// cliLimit bounds one command of the CLI tests.
const cliLimit = 60 * time.Second

// stack is a real redis-server and reference gateway, and the workers a
// test starts on them.
type stack struct {
	redisURL, gatewayURL, token string
}

func startStack(t *testing.T) *stack {
	t.Helper()
	binaries(t)
	srv := redistest.StartServer(t)
	token := randomToken(t)
	addr := freeAddr(t)
	gw := start(t, progGateway, []string{progGateway, "-addr", addr, "-state-dir", t.TempDir()}, map[string]string{"GATEWAY_TOKEN": token})
	waitHealthy(t, gw, addr, startLimit)
	return &stack{redisURL: srv.URL(0), gatewayURL: "http://" + addr, token: token}
}

// env is what enqueue needs.
func (s *stack) env() map[string]string { return map[string]string{"REDIS_URL": s.redisURL} }

// startWorker starts a worker with args and waits until it serves.
func (s *stack) startWorker(t *testing.T, args ...string) *proc {
	t.Helper()
	addr := freeAddr(t)
	argv := append([]string{progWorker, "-http", addr, "-log-level", "debug"}, args...)
	p := start(t, progWorker, argv, map[string]string{"REDIS_URL": s.redisURL, "GATEWAY_URL": s.gatewayURL, "GATEWAY_TOKEN": s.token})
	waitHealthy(t, p, addr, startLimit)
	return p
}

// waitOutput waits until p has printed want, failing the test when p exits
// first or limit passes.
func waitOutput(t *testing.T, p *proc, want string, limit time.Duration) {
	t.Helper()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(p.out.String(), want) {
		select {
		case <-p.done:
			if strings.Contains(p.out.String(), want) {
				return
			}
			t.Fatalf("%s exited (%v) without printing %q:\n%s", p.name, p.err, want, p.out.String())
		case <-deadline.C:
			t.Fatalf("%s did not print %q within %v:\n%s", p.name, want, limit, p.out.String())
		case <-tick.C:
		}
	}
}

// waitExit waits for p to exit and returns its exit code.
func waitExit(t *testing.T, p *proc, limit time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(limit):
		t.Fatalf("%s did not exit within %v:\n%s", p.name, limit, p.out.String())
	}
	return p.cmd.ProcessState.ExitCode()
}

// enqueue runs enqueue with args (and stdin) to its end.
func enqueue(t *testing.T, s *stack, stdin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliLimit)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binaries(t), progEnqueue), args...)
	cmd.Env = environ(s.env())
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) || ctx.Err() != nil {
		t.Fatalf("enqueue %q: %v\nstderr:\n%s", args, err, errb.String())
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

func decodeResult(t *testing.T, line string) jobs.Result {
	t.Helper()
	var r jobs.Result
	if err := json.Unmarshal([]byte(strings.TrimSpace(line)), &r); err != nil {
		t.Fatalf("result %q: %v", line, err)
	}
	return r
}

// TestNoWorkerWarning: a job that no worker serves is not a silent wait.
// enqueue -wait warns when no live worker serves the job's queue, and
// keeps waiting; a worker started with -queues serves the queues it names
// and, whatever they are, boxq's own (a terminate); the job waiting in the
// default queue runs once a worker serves it.
func TestNoWorkerWarning(t *testing.T) {
	s := startStack(t)
	waiting := start(t, "enqueue-default", []string{progEnqueue, "-task", "nw", "-wait", "--", "echo hi"}, s.env())
	waitOutput(t, waiting, `no live worker serves queue "default" (no worker is running)`, cliLimit)

	s.startWorker(t, "-queues", "batch=2")
	stdout, stderr, code := enqueue(t, s, "", "-task", "qb", "-queue", "batch", "-wait", "--", "echo batch")
	if code != 0 || stdout != "batch\n" {
		t.Fatalf("a job of queue batch: exit %d, stdout %q; want 0, \"batch\\n\"\n%s", code, stdout, stderr)
	}
	// The terminate job goes to boxq's own queue, which the batch-only
	// worker serves too.
	if _, stderr, code := enqueue(t, s, "", "-terminate", "-task", "qb", "-wait"); code != 0 || !strings.Contains(stderr, `task "qb" terminated`) {
		t.Errorf("-terminate -wait with a worker of queue batch only: exit %d, %q; want the task terminated", code, stderr)
	}

	other := start(t, "enqueue-other", []string{progEnqueue, "-task", "o", "-id", "job-other", "-queue", "other", "-wait", "--", "echo never"}, s.env())
	waitOutput(t, other, `no live worker serves queue "other" (live workers serve batch, boxq)`, cliLimit)
	// Interrupted, it names the job that has no result yet.
	if err := other.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, other, cliLimit); code != 1 || !strings.Contains(other.out.String(), "job job-other has no result yet: interrupted") {
		t.Errorf("the interrupted enqueue -wait exited %d, want 1 and the job named\n%s", code, other.out.String())
	}

	// Still waiting all along: a worker of the default queue ends it.
	s.startWorker(t, "-queues", "default=3,batch=1")
	if code := waitExit(t, waiting, cliLimit); code != 0 || !strings.Contains(waiting.out.String(), "hi\n") {
		t.Errorf("the waiting enqueue exited %d, want 0 with hi\n%s", code, waiting.out.String())
	}
}

// TestWaitingAndFlags: -result -wait waits; -result without it says what
// the job waits for; -cancel of a finished job exits 1; -terminate of a
// task without a sandbox says so; the -f flag rule; stdin only with
// -stdin-file -; a missing own cwd is not echoed back; timeout_s beyond
// the maximum is rejected.
func TestWaitingAndFlags(t *testing.T) {
	s := startStack(t)
	s.startWorker(t)

	stdout, stderr, code := enqueue(t, s, "", "-task", "rw", "--", "sleep 2; echo done")
	id := strings.TrimSpace(stdout)
	if code != 0 || id == "" {
		t.Fatalf("enqueue: exit %d, %q, %q", code, stdout, stderr)
	}
	if _, stderr, code := enqueue(t, s, "", "-result", id); code != 1 || !strings.Contains(stderr, "no result yet") || !strings.Contains(stderr, "-wait") {
		t.Errorf("-result of a running job: exit %d, %q; want 1, no result yet, a hint at -wait", code, stderr)
	}
	stdout, stderr, code = enqueue(t, s, "", "-result", id, "-wait")
	if r := decodeResult(t, stdout); code != 0 || r.ID != id || r.Output != "done\n" {
		t.Errorf("-result -wait: exit %d, %+v; want 0 and the result (stderr %q)", code, r, stderr)
	}
	if _, stderr, code := enqueue(t, s, "", "-cancel", id); code != 1 || !strings.Contains(stderr, "already finished") {
		t.Errorf("-cancel of a finished job: exit %d, %q; want 1, already finished", code, stderr)
	}
	if _, stderr, code := enqueue(t, s, "", "-terminate", "-task", "nosuchtask"); code != 0 || !strings.Contains(stderr, "had no sandbox") {
		t.Errorf("-terminate of a task without a sandbox: exit %d, %q; want it said", code, stderr)
	}

	t.Run("flag rule", func(t *testing.T) {
		batch := `{"id":"fr-1","task_id":"fr","command":"sleep 3"}
{"id":"fr-2","task_id":"fr","command":"pwd","timeout_s":5,"cwd":"/"}
{"id":"fr-3","task_id":"fr2","command":"pwd"}
`
		stdout, stderr, code := enqueue(t, s, batch, "-f", "-", "-wait", "-timeout", "1s", "-cwd", "/tmp")
		got := map[string]jobs.Result{}
		for l := range strings.Lines(stdout) {
			r := decodeResult(t, l)
			got[r.ID] = r
		}
		if code != 0 || len(got) != 3 {
			t.Fatalf("exit %d, %d results; want 0, 3\n%s\n%s", code, len(got), stdout, stderr)
		}
		if r := got["fr-1"]; r.Status != jobs.StatusTimeout {
			t.Errorf("fr-1 (no timeout_s, -timeout 1s): %s after %d ms; want timeout", r.Status, r.DurationMs)
		}
		if r := got["fr-2"]; r.Output != "/\n" || r.Status != jobs.StatusCompleted {
			t.Errorf("fr-2 (its own cwd and timeout): %s %q; want completed in /", r.Status, r.Output)
		}
		if r := got["fr-3"]; r.Output != "/tmp\n" {
			t.Errorf("fr-3 (no cwd, -cwd /tmp): output %q; want /tmp", r.Output)
		}
		for _, args := range [][]string{{"-f", "-", "-id", "x"}, {"-f", "-", "-stdin-file", "in"}, {"-f", "-", "-task", "t"}} {
			if _, stderr, code := enqueue(t, s, batch, args...); code != 2 {
				t.Errorf("enqueue %q: exit %d, want 2 (usage)\n%s", args, code, stderr)
			}
		}
	})

	t.Run("stdin", func(t *testing.T) {
		if stdout, _, code := enqueue(t, s, "hello\n", "-task", "in", "-wait", "-stdin-file", "-", "--", "cat"); code != 0 || stdout != "hello\n" {
			t.Errorf("-stdin-file -: exit %d, %q; want hello", code, stdout)
		}
		// Without -stdin-file, stdin is not read: a while-read loop keeps
		// its input.
		if stdout, _, code := enqueue(t, s, "hello\n", "-task", "in", "-wait", "--", "cat"); code != 0 || stdout != "" {
			t.Errorf("no -stdin-file: exit %d, %q; want nothing read", code, stdout)
		}
	})

	t.Run("missing own cwd", func(t *testing.T) {
		stdout, _, code := enqueue(t, s, "", "-task", "nc", "-cwd", "/nonexistent/dir", "-wait", "-json", "--", "true")
		r := decodeResult(t, stdout)
		if code != 126 || r.Cwd == "/nonexistent/dir" {
			t.Errorf("a missing -cwd: exit %d, result cwd %q; want 126 and the task's cwd, not the missing one", code, r.Cwd)
		}
	})

	t.Run("timeout beyond the maximum", func(t *testing.T) {
		stdout, stderr, code := enqueue(t, s, `{"task_id":"big","command":"true","timeout_s":99999}`+"\n", "-f", "-", "-wait")
		r := decodeResult(t, stdout)
		if code != 1 || r.Status != jobs.StatusError || !strings.Contains(r.Error, "maximum is 3600") || r.ID != "invalid-line-1" || r.FinishedAt.IsZero() {
			t.Errorf("timeout_s 99999: exit %d, %+v; want 1 and an error result naming the maximum\n%s", code, r, stderr)
		}
	})
}

// TestProgressBarTerminal runs a batch with stdout and stderr on one
// pseudo-terminal, as a user at a terminal does, and reads the screen back
// through a minimal terminal (carriage return, erase to end of line, line
// feed): every result line must stand alone, the bar must not be left
// behind, and the summary must count by status and return code.
func TestProgressBarTerminal(t *testing.T) {
	s := startStack(t)
	s.startWorker(t)
	var batch strings.Builder
	for i := range 12 {
		cmd := "echo ok"
		switch i % 4 {
		case 1:
			cmd = "exit 2"
		case 2:
			cmd = "sleep 0.3; echo slower and a little longer"
		}
		json.NewEncoder(&batch).Encode(map[string]any{"task_id": "pty-" + string(rune('a'+i%3)), "command": cmd})
	}
	json.NewEncoder(&batch).Encode(map[string]any{"task_id": "pty-t", "command": "sleep 5", "timeout_s": 1})
	file := filepath.Join(t.TempDir(), "batch.jsonl")
	if err := os.WriteFile(file, []byte(batch.String()), 0o644); err != nil {
		t.Fatal(err)
	}

	// A narrow terminal: a bar wider than it would wrap, and each redraw
	// would leave a row behind.
	const cols = 40
	master, slave := openPTY(t, cols)
	ctx, cancel := context.WithTimeout(context.Background(), cliLimit)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binaries(t), progEnqueue), "-f", file, "-wait")
	cmd.Env = environ(s.env())
	cmd.Stdout, cmd.Stderr = slave, slave
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	slave.Close()
	var screen bytes.Buffer
	read := make(chan struct{})
	go func() {
		defer close(read)
		// Until the last writer is gone: then the read fails with EIO.
		_, _ = io.Copy(&screen, master)
	}()
	err := cmd.Wait()
	<-read
	master.Close()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	raw := screen.String()
	lines := render(raw)
	t.Logf("screen:\n%s", strings.Join(lines, "\n"))
	if code := cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit %d, want 0 (no result is an error)", code)
	}
	results := 0
	for _, l := range lines {
		switch {
		case strings.Contains(l, `{"id"`):
			results++
			if !strings.HasPrefix(l, `{"id"`) || !json.Valid([]byte(l)) {
				t.Errorf("a result line is garbled: %q", l)
			}
		case strings.HasPrefix(l, "["):
			t.Errorf("the progress bar was left on the screen: %q", l)
		}
	}
	if results != 13 {
		t.Errorf("%d result lines on the screen, want 13", results)
	}
	summary := strings.Join(lines, "\n")
	for _, want := range []string{"13 results in", "completed 12 (3 rc≠0)", "timeout 1", "rc 0 ×9", "rc 2 ×3", "rc 124 ×1", "p50", "p90"} {
		if !strings.Contains(summary, want) {
			t.Errorf("the summary lacks %q", want)
		}
	}
	if !strings.Contains(raw, "\x1b[K") || !strings.Contains(raw, "/13 completed") {
		t.Errorf("no progress bar drawn on the terminal; raw output %q", raw)
	}
	for _, draw := range strings.Split(raw, "\r") {
		bar, _, ok := strings.Cut(draw, "\x1b[K")
		if ok && utf8.RuneCountInString(bar) >= cols {
			t.Errorf("a bar of %d columns on a terminal of %d: it wraps: %q", utf8.RuneCountInString(bar), cols, bar)
		}
	}
}

// openPTY opens a pseudo-terminal pair of cols columns with /dev/ptmx (no
// library needed: unlock the slave, ask its number, set its size).
func openPTY(t *testing.T, cols int) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	var unlock int32
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, m.Fd(), syscall.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock))); errno != 0 {
		m.Close()
		t.Fatalf("unlockpt: %v", errno)
	}
	var n uint32
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, m.Fd(), syscall.TIOCGPTN, uintptr(unsafe.Pointer(&n))); errno != 0 {
		m.Close()
		t.Fatalf("ptsname: %v", errno)
	}
	s, err := os.OpenFile("/dev/pts/"+strconv.Itoa(int(n)), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		m.Close()
		t.Fatal(err)
	}
	ws := struct{ Row, Col, X, Y uint16 }{Row: 24, Col: uint16(cols)}
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, s.Fd(), syscall.TIOCSWINSZ, uintptr(unsafe.Pointer(&ws))); errno != 0 {
		m.Close()
		s.Close()
		t.Fatalf("set the window size: %v", errno)
	}
	return m, s
}

// render plays output on a minimal terminal of unbounded width and returns
// its lines: "\r" goes to the line's start, ESC [ K erases to its end,
// "\n" starts a new line, and other characters overwrite.
func render(out string) []string {
	var lines []string
	var cur []rune
	col := 0
	for i := 0; i < len(out); {
		switch {
		case strings.HasPrefix(out[i:], "\x1b[K"):
			cur = cur[:min(col, len(cur))]
			i += 3
		case out[i] == '\r':
			col = 0
			i++
		case out[i] == '\n':
			lines = append(lines, string(cur))
			cur, col = nil, 0
			i++
		default:
			r, n := utf8.DecodeRuneInString(out[i:])
			if col < len(cur) {
				cur[col] = r
			} else {
				cur = append(cur, r)
			}
			col++
			i += n
		}
	}
	if len(cur) > 0 {
		lines = append(lines, string(cur))
	}
	return lines
}
