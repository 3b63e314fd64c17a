package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// lineReader reads a batch's lines in a goroutine of its own, so that an
// interrupt ends the batch at once, even while it reads a pipe that stays
// open with nothing to read (`(echo …; sleep 8) | enqueue -f - -wait`):
// a read blocked in the kernel does not look at a context.
type lineReader struct {
	lines chan lineRead
	stop  chan struct{}
	done  chan struct{}
	// unblock makes a read blocked on the input return at once; nil when
	// the input need not be woken (a regular file) or cannot be (a
	// reader other than a file).
	unblock func()
	// restore releases what made the input wakeable, once the read is
	// over.
	restore func()
	closed  sync.Once
}

// lineRead is one line of the input, as readLine returns it.
type lineRead struct {
	line    []byte
	tooLong bool
	err     error
}

// newLineReader starts reading in's lines, each at most limit bytes.
func newLineReader(in io.Reader, limit int) *lineReader {
	r := &lineReader{lines: make(chan lineRead), stop: make(chan struct{}), done: make(chan struct{})}
	in, r.unblock, r.restore = wakeable(in)
	rd := bufio.NewReaderSize(in, 64<<10)
	go func() {
		defer close(r.done)
		for {
			line, tooLong, err := readLine(rd, limit)
			select {
			case r.lines <- lineRead{line, tooLong, err}:
			case <-r.stop:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return r
}

// next returns the next line, or ctx's error when ctx ends first.
func (r *lineReader) next(ctx context.Context) (lineRead, error) {
	select {
	case l := <-r.lines:
		return l, nil
	case <-ctx.Done():
		return lineRead{}, ctx.Err()
	}
}

// closeWait bounds how long close waits for a woken read to end. A woken
// read ends at once, but one case escapes the wake-up: another process
// reading the same blocking pipe takes the data between poll and read,
// and the read then waits for more. An interrupt must not wait for that
// (main's signal.NotifyContext holds a second Ctrl-C until run returns).
const closeWait = time.Second

// close stops the reading goroutine and, when its read can be woken,
// waits for it to end (at most closeWait). It may be called more than
// once.
func (r *lineReader) close() {
	r.closed.Do(func() {
		close(r.stop)
		if r.unblock == nil {
			return
		}
		r.unblock()
		select {
		case <-r.done:
			r.restore()
		case <-time.After(closeWait):
			// Left to end with the process; what it holds is not
			// released under it.
		}
	})
}

// wakeable returns in, or a reader of the same input whose blocked read an
// unblock call ends (with an error), and what to release once the read is
// over. An input Go's poller takes (a non-blocking pipe, a FIFO opened by
// name) is woken by a read deadline. Any other input but a regular file (a
// shell's pipe, a terminal, a socket: in blocking mode) is read only once
// poll(2) says it has data, and unblock wakes that poll through a pipe of
// its own. The input's mode is never changed: it belongs to the open file
// description, which the shell shares with the other commands of the
// pipeline's stage (`gen | { enqueue -f -; cat; }`) and which outlives
// this process if it is killed; in non-blocking mode their reads would
// fail with EAGAIN. Regular files never block for long: read as they are.
func wakeable(in io.Reader) (io.Reader, func(), func()) {
	f, ok := in.(*os.File)
	if !ok {
		return in, nil, nil
	}
	if f.SetReadDeadline(time.Time{}) == nil {
		return f, func() { _ = f.SetReadDeadline(time.Now()) }, func() { _ = f.SetReadDeadline(time.Time{}) }
	}
	st, err := f.Stat()
	if err != nil || st.Mode().IsRegular() {
		return in, nil, nil
	}
	var wake [2]int
	if err := unix.Pipe2(wake[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return in, nil, nil
	}
	pr := &pollReader{f: f, fd: int(f.Fd()), wake: wake[0]}
	return pr, func() { _, _ = unix.Write(wake[1], []byte{0}) }, func() {
		unix.Close(wake[0])
		unix.Close(wake[1])
	}
}

// pollReader reads a blocking descriptor once poll(2) says it is
// readable, or answers os.ErrDeadlineExceeded once its wake pipe is.
type pollReader struct {
	f    *os.File
	fd   int
	wake int
}

func (p *pollReader) Read(b []byte) (int, error) {
	fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}, {Fd: int32(p.wake), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("poll: %w", err)
		}
		if fds[1].Revents != 0 {
			return 0, os.ErrDeadlineExceeded
		}
		if fds[0].Revents != 0 {
			// Readable, at its end (POLLHUP) or in error: the read
			// answers at once. (A process sharing the pipe may take the
			// data first; then this read waits, as any blocking read.)
			return p.f.Read(b)
		}
	}
}
