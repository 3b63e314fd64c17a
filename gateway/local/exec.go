package local

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/boxq/boxq/gateway"
)

// outputGrace bounds how long an exec's end waits for its output pipe to
// close after its process group is killed. Only a process that left the
// group (setsid, without isolation) can hold the pipe that long; its later
// output is dropped.
const outputGrace = time.Second

// readBufSize is the read buffer of one running exec. Small, so that a
// thousand running execs cost a few MiB: pipes hand over 64 KiB at most
// per read anyway.
const readBufSize = 8 << 10

// execution is one exec: a bash process and, once it ends, its state.
type execution struct {
	id   string
	log  *slog.Logger
	done chan struct{} // closed when the exec has ended

	// Set before done is closed, read-only after. The terminal state is
	// kept only as its JSON, encoded once: a poll writes these bytes as
	// they are, however often it comes, and they are what the retention
	// caps count.
	status  string
	encoded []byte

	retained *retainedExec // its entry in the retention FIFO; guarded by Server.mu

	mu         sync.Mutex
	pgid       int    // the process group; 0 until the process started
	exited     bool   // the process was reaped: its pgid may be reused
	killReason string // gateway.StatusTimeout or StatusCancelled, once killed
}

func newExecution(id string, log *slog.Logger) *execution {
	return &execution{id: id, log: log, done: make(chan struct{})}
}

// writeState answers a start or a poll with the exec's state.
func (e *execution) writeState(w http.ResponseWriter) {
	select {
	case <-e.done:
		writeRawJSON(w, http.StatusOK, e.encoded)
	default:
		writeJSON(w, http.StatusOK, gateway.ExecState{ExecID: e.id, Status: gateway.StatusRunning})
	}
}

// retainedSize is what a finished exec costs while it is kept: its
// encoded state and a rough allowance for the structures around it.
func (e *execution) retainedSize() int64 { return int64(len(e.encoded)) + 512 }

// ended reports whether the exec has ended.
func (e *execution) ended() bool {
	select {
	case <-e.done:
		return true
	default:
		return false
	}
}

// kill ends the exec's whole process group, for reason (a timeout or a
// cancel); the first reason wins. Before the process starts, it only
// records the reason, and the start kills at once. After the process is
// reaped it does nothing: its group id may belong to someone else by then.
func (e *execution) kill(reason string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.exited || e.killReason != "" {
		return
	}
	e.killReason = reason
	if e.pgid != 0 {
		_ = syscall.Kill(-e.pgid, syscall.SIGKILL)
	}
}

// finish records the exec's end, calls ended, and wakes every waiter.
// ended comes between, so that it sees the encoded state (for its size)
// and so that whoever sees e ended also sees what ended did.
func (e *execution) finish(status string, rc int, output string, omitted int64, ended func()) {
	e.log.Debug("exec ended", "status", status, "returncode", rc, "output_bytes", len(output), "omitted_bytes", omitted)
	e.status = status
	e.encoded = encodeJSON(gateway.ExecState{ExecID: e.id, Status: status, Output: output, ReturnCode: &rc, OutputOmitted: &omitted})
	ended()
	close(e.done)
}

// execSpec is what the process of an exec needs.
type execSpec struct {
	dirs    fsDirs
	cwd     string // as the sandbox sees it
	command string
	stdin   string
	timeout time.Duration // 0: none (the sandbox's lifetime still ends it)
	rt      *sandboxRuntime
}

// launch starts the process of e and returns once it runs or has failed
// to start; a goroutine then supervises it to its end and finishes e,
// which calls ended before it wakes the waiters, so that whoever sees e
// ended also sees it no longer counted as running. A process that cannot
// start ends e as failed.
func (s *Server) launch(e *execution, spec execSpec, ended func(at time.Time)) {
	fail := func(rc int, msg string) {
		e.log.Warn("exec could not start", "error", msg)
		e.finish(gateway.StatusFailed, rc, msg+"\n", 0, func() { ended(s.cfg.Now()) })
	}
	if s.launcher.mode == IsolationNone {
		// bwrap says itself when it cannot chdir; without it, the start
		// would fail with an error that does not say which path is wrong.
		dir := hostPath(spec.dirs, spec.cwd)
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			fail(1, fmt.Sprintf("gateway: can't chdir to %s: no such directory", spec.cwd))
			return
		}
	}
	if err := checkTopLevel(spec.dirs); err != nil {
		fail(126, "gateway: sandbox: "+err.Error())
		return
	}
	if strings.IndexByte(spec.command, 0) >= 0 {
		// bash -c could not be given one; the loader would drop it.
		fail(126, "gateway: start: the command holds a NUL byte")
		return
	}
	var stdin *os.File
	if spec.stdin != "" {
		f, err := s.stdinFile(spec.stdin)
		if err != nil {
			fail(126, "gateway: stdin: "+err.Error())
			return
		}
		defer f.Close() // the child has its own copy once started
		stdin = f
	}

	// One pipe for stdout and stderr, so that their order is kept.
	pr, pw, err := os.Pipe()
	if err != nil {
		fail(126, "gateway: output pipe: "+err.Error())
		return
	}
	script, err := newScriptPipe()
	if err != nil {
		pr.Close()
		pw.Close()
		fail(126, "gateway: "+err.Error())
		return
	}
	cmd := s.launcher.command(spec.dirs, spec.cwd, script.r)
	if stdin != nil {
		cmd.Stdin = stdin
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if spec.dirs.group != nil {
		spec.dirs.group.Wrap(cmd) // into the sandbox's cgroup before any of its code runs
	}
	oomBefore := spec.rt.oomKills()
	err = cmd.Start()
	pw.Close()
	script.feed(spec.command)
	if err != nil {
		script.wait()
		pr.Close()
		fail(126, "gateway: start: "+err.Error())
		return
	}
	pid := cmd.Process.Pid

	e.mu.Lock()
	e.pgid = pid
	if e.killReason != "" {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	e.mu.Unlock()

	var timer *time.Timer
	if spec.timeout > 0 {
		timer = time.AfterFunc(spec.timeout, func() { e.kill(gateway.StatusTimeout) })
	}

	out := newCapBuffer(s.cfg.OutputLimit, s.runDir)
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		buf := make([]byte, readBufSize)
		for {
			n, err := pr.Read(buf)
			_, _ = out.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}()

	go func() {
		// What the command left running in its group ends with it, as it
		// does under bubblewrap when its PID namespace goes: an exec's
		// processes never outlive the exec. Best killed while the leader
		// is a zombie: its pid, and so the group's id, cannot be reused
		// until it is reaped.
		zombie := awaitExit(pid)
		if zombie {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
		}
		waitErr := cmd.Wait()
		if timer != nil {
			timer.Stop()
		}
		e.mu.Lock()
		e.exited = true
		reason := e.killReason
		e.mu.Unlock()
		if !zombie {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
		}
		script.wait()
		select {
		case <-readDone:
		case <-time.After(outputGrace):
			pr.Close() // unblocks the reader
			<-readDone
		}
		pr.Close()
		status, rc := outcome(cmd.ProcessState, waitErr, reason)
		output, omitted := out.Result()
		e.finish(status, rc, output+spec.rt.oomNote(oomBefore), omitted, func() { ended(s.cfg.Now()) })
	}()
}

// outcome turns how a process ended into an exec status and return code.
func outcome(ps *os.ProcessState, waitErr error, killReason string) (string, int) {
	switch killReason {
	case gateway.StatusTimeout:
		return gateway.StatusTimeout, gateway.ReturnCodeTimeout
	case gateway.StatusCancelled:
		return gateway.StatusCancelled, gateway.ReturnCodeCancelled
	}
	if ps == nil {
		return gateway.StatusFailed, 1
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return gateway.StatusFailed, 128 + int(ws.Signal())
	}
	var exitErr *exec.ExitError
	if waitErr != nil && !errors.As(waitErr, &exitErr) {
		return gateway.StatusFailed, 1
	}
	if rc := ps.ExitCode(); rc != 0 {
		return gateway.StatusFailed, rc
	}
	return gateway.StatusCompleted, 0
}

// stdinFile returns an unlinked file holding data, to be a command's
// stdin: unlike a pipe it needs no goroutine, and a command that never
// reads it blocks nothing.
func (s *Server) stdinFile(data string) (*os.File, error) {
	f, err := os.CreateTemp(s.runDir, "stdin-")
	if err != nil {
		return nil, err
	}
	_ = os.Remove(f.Name())
	if _, err := f.WriteString(data); err != nil {
		f.Close()
		return nil, err
	}
	if _, err := f.Seek(0, 0); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// sysPidfdOpen is pidfd_open(2), the same number on every architecture;
// package syscall predates it.
const sysPidfdOpen = 434

// awaitExit waits until process pid has exited, without reaping it, and
// reports whether it did. It waits in the runtime's poller on a pidfd of
// its own, where cmd.Wait would block an OS thread: a thousand running
// execs then cost a thousand parked goroutines, not a thousand threads.
// Where pidfds do not work it returns false at once, and cmd.Wait does
// the waiting.
func awaitExit(pid int) bool {
	// pid is our child and not yet reaped: it cannot name another process.
	fd, _, errno := syscall.Syscall(sysPidfdOpen, uintptr(pid), uintptr(syscall.O_NONBLOCK), 0)
	if errno != 0 {
		return false
	}
	// Non-blocking, so os.NewFile registers it with the poller.
	f := os.NewFile(fd, "pidfd")
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	// The callback must look for itself: the poller forgets a readiness
	// that came before this call, and waits only for the next one.
	exited := false
	err = rc.Read(func(fd uintptr) bool {
		var werr error
		exited, werr = readable(int(fd))
		// On an error, stop waiting here: cmd.Wait will wait instead.
		return exited || werr != nil
	})
	return err == nil && exited
}

// readable reports whether fd is readable now (for a pidfd: its process
// has exited), by a ppoll(2) that does not block.
func readable(fd int) (bool, error) {
	type pollFd struct {
		fd      int32
		events  int16
		revents int16
	}
	const (
		pollIn   = 0x1
		pollErr  = 0x8
		pollNval = 0x20
	)
	pfd := pollFd{fd: int32(fd), events: pollIn}
	var zero syscall.Timespec
	n, _, errno := syscall.Syscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1, uintptr(unsafe.Pointer(&zero)), 0, 0, 0)
	switch {
	case errno != 0:
		return false, errno
	case n == 1 && pfd.revents&(pollErr|pollNval) != 0:
		return false, fmt.Errorf("ppoll: revents %#x", pfd.revents)
	}
	return n == 1 && pfd.revents&pollIn != 0, nil
}
