package main

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// nonblocking reports whether f's open file description is in
// non-blocking mode. The mode belongs to the description, which a shell
// shares between every process of a pipeline's stage (`gen | { enqueue -f
// -; cat; }`) and which outlives a killed enqueue.
func nonblocking(t *testing.T, f *os.File) bool {
	t.Helper()
	flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	return flags&unix.O_NONBLOCK != 0
}

// TestLineReaderLeavesPipeModeAlone: reading a shell's pipe (blocking
// mode) never switches the pipe to non-blocking mode, not even while the
// read goes on: another reader of the same pipe (the next command of a
// `{ …; …; }` group, or the same group after enqueue was SIGKILLed and
// could restore nothing) would get EAGAIN ("Resource temporarily
// unavailable") instead of waiting for data. The read still ends at once
// when the reader is closed with the pipe open and empty, and what was
// written after is left in the pipe for the next reader.
func TestLineReaderLeavesPipeModeAlone(t *testing.T) {
	r, w := blockingPipe(t)
	if nonblocking(t, r) {
		t.Fatal("blockingPipe gave a non-blocking pipe")
	}
	lr := newLineReader(r, 1<<20)
	if _, err := fmt.Fprintln(w, "one"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), interruptLimit)
	defer cancel()
	l, err := lr.next(ctx)
	if err != nil || string(l.line) != "one" || l.err != nil {
		t.Fatalf("next: %q, %v, %v; want the line one", l.line, l.err, err)
	}
	// The reading goroutine now waits for the next line.
	if nonblocking(t, r) {
		t.Error("while enqueue reads it, the pipe is in non-blocking mode: a process sharing it (or left with it after a SIGKILL) reads EAGAIN")
	}
	closed := make(chan struct{})
	go func() { lr.close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(interruptLimit):
		t.Fatalf("close still waits for the read after %v, with the pipe open", interruptLimit)
	}
	if nonblocking(t, r) {
		t.Error("after close, the pipe is in non-blocking mode")
	}
	if _, err := fmt.Fprintln(w, "after"); err != nil {
		t.Fatal(err)
	}
	w.Close()
	b := make([]byte, 64)
	n, err := r.Read(b)
	if string(b[:n]) != "after\n" {
		t.Errorf("read after close: %q, %v; want the line written after", b[:n], err)
	}
}

// pty returns a terminal (its reading side, opened in blocking mode as a
// shell's terminal is) and its master, to type into.
func pty(t *testing.T) (tty, master *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminal: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(fmt.Sprintf("/dev/pts/%d", n), unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	tty = os.NewFile(uintptr(fd), "tty")
	t.Cleanup(func() { tty.Close() })
	return tty, m
}

// TestLineReaderTerminal: a batch typed at a terminal is read line by line;
// closing the reader while nothing more is typed ends its read at once,
// leaves the terminal in blocking mode (it is the shell's) and leaves what
// is typed after to the next reader.
func TestLineReaderTerminal(t *testing.T) {
	tty, master := pty(t)
	lr := newLineReader(tty, 1<<20)
	if _, err := fmt.Fprint(master, "one\n"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), interruptLimit)
	defer cancel()
	if l, err := lr.next(ctx); err != nil || string(l.line) != "one" {
		t.Fatalf("next: %q, %v, %v; want the line one", l.line, l.err, err)
	}
	closed := make(chan struct{})
	go func() { lr.close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(interruptLimit):
		t.Fatalf("close still waits for the terminal's read after %v", interruptLimit)
	}
	if nonblocking(t, tty) {
		t.Error("after close, the terminal is in non-blocking mode")
	}
	if _, err := fmt.Fprint(master, "after\n"); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 64)
	if n, err := tty.Read(b); string(b[:n]) != "after\n" {
		t.Errorf("read after close: %q, %v; want the line typed after", b[:n], err)
	}
}

// TestLineReaderEnds: a regular file, /dev/null and a FIFO opened by name
// are read to their end, every line once, and close after returns.
func TestLineReaderEnds(t *testing.T) {
	dir := t.TempDir()
	file := dir + "/batch"
	if err := os.WriteFile(file, []byte("a\nb\nc"), 0o644); err != nil {
		t.Fatal(err)
	}
	fifo := dir + "/fifo"
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	go func() {
		// The writer's open waits for the reader's.
		if w, err := os.OpenFile(fifo, os.O_WRONLY, 0); err == nil {
			fmt.Fprint(w, "a\nb\nc\n")
			w.Close()
		}
	}()
	for _, c := range []struct {
		name, path string
		want       []string
	}{
		{"regular file", file, []string{"a", "b", "c"}},
		{"/dev/null", os.DevNull, nil},
		{"fifo", fifo, []string{"a", "b", "c"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, err := os.Open(c.path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			lr := newLineReader(f, 1<<20)
			defer lr.close()
			ctx, cancel := context.WithTimeout(context.Background(), interruptLimit)
			defer cancel()
			var got []string
			for {
				l, err := lr.next(ctx)
				if err != nil {
					t.Fatalf("next: %v after %q", err, got)
				}
				if len(l.line) > 0 {
					got = append(got, string(l.line))
				}
				if l.err != nil {
					break
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(c.want) {
				t.Errorf("lines %q; want %q", got, c.want)
			}
		})
	}
}
