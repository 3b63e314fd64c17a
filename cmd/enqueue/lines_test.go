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
