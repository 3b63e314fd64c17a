package main

import (
	"bufio"
	"context"
	"io"
	"os"
	"sync"
	"syscall"
	"time"
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
	// the input cannot be woken (a terminal: the process exits right
	// after the interrupt, which ends the read).
	unblock func()
	// restore undoes what made the input wakeable, once the read is over.
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

// close stops the reading goroutine and, when its read can be woken,
// waits for it to end. It may be called more than once.
func (r *lineReader) close() {
	r.closed.Do(func() {
		close(r.stop)
		if r.unblock == nil {
			return
		}
		r.unblock()
		<-r.done
		r.restore()
	})
}

// wakeable returns in, or a reader of the same input whose blocked read an
// unblock call ends (with an error), and what undoes the change. Pipes and
// FIFOs can be made so: Go's poller waits on them when they are in
// non-blocking mode, and a read deadline then wakes a read. A pipe handed
// to this process as its stdin is in blocking mode; a duplicate of its
// descriptor, switched to non-blocking, is read instead, and switched back
// at the end (the mode belongs to the pipe, which the shell may reuse).
// Regular files never block for long, and terminals are left alone (the
// mode would be the shell's too): they are read as they are.
func wakeable(in io.Reader) (io.Reader, func(), func()) {
	f, ok := in.(*os.File)
	if !ok {
		return in, nil, nil
	}
	wake := func(f *os.File) func() {
		return func() { _ = f.SetReadDeadline(time.Now()) }
	}
	if f.SetReadDeadline(time.Time{}) == nil {
		return f, wake(f), func() { _ = f.SetReadDeadline(time.Time{}) }
	}
	st, err := f.Stat()
	if err != nil || st.Mode()&os.ModeNamedPipe == 0 {
		return in, nil, nil
	}
	fd, err := syscall.Dup(int(f.Fd()))
	if err != nil {
		return in, nil, nil
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return in, nil, nil
	}
	nf := os.NewFile(uintptr(fd), f.Name())
	if nf.SetReadDeadline(time.Time{}) != nil {
		// Not taken by the poller after all: read the original.
		nf.Close()
		_ = syscall.SetNonblock(int(f.Fd()), false)
		return in, nil, nil
	}
	return nf, wake(nf), func() {
		_ = nf.SetReadDeadline(time.Time{})
		_ = nf.Fd() // switches the pipe back to blocking mode
		nf.Close()
	}
}
