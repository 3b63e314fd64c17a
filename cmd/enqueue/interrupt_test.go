package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/internal/syncbuf"
	"github.com/boxq/boxq/jobs"
)

// interruptLimit bounds how long a test waits for what it expects; a
// failure to stop shows as this wait running out.
const interruptLimit = 30 * time.Second

// batchRun is one run of enqueue, in the background, that the test
// interrupts as Ctrl-C does: main's signal.NotifyContext cancels run's
// context.
type batchRun struct {
	interrupt context.CancelFunc
	stdout    syncbuf.Buffer
	stderr    syncbuf.Buffer
	done      chan error
}

func startRun(t *testing.T, args []string, stdin io.Reader) *batchRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	r := &batchRun{interrupt: cancel, done: make(chan error, 1)}
	go func() { r.done <- run(ctx, args, noenv, stdin, &r.stdout, &r.stderr) }()
	return r
}

// wait returns run's error, failing the test when it does not return
// within interruptLimit.
func (r *batchRun) wait(t *testing.T, what string) error {
	t.Helper()
	select {
	case err := <-r.done:
		return err
	case <-time.After(interruptLimit):
		t.Fatalf("%s: enqueue still runs %v after the interrupt; stderr:\n%s", what, interruptLimit, r.stderr.String())
		return nil
	}
}

// waitEnqueued waits until every job of ids is in Redis, failing the test
// when run ends first.
func waitEnqueued(t *testing.T, rdb *redis.Client, r *batchRun, ids ...string) {
	t.Helper()
	prod, err := jobs.NewProducer(rdb, jobs.ProducerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.After(interruptLimit)
	for _, id := range ids {
		for {
			if _, err := prod.Status(context.Background(), id); err == nil {
				break
			}
			select {
			case err := <-r.done:
				t.Fatalf("enqueue ended (%v) before job %s was enqueued; stderr:\n%s", err, id, r.stderr.String())
			case <-deadline:
				t.Fatalf("job %s not enqueued within %v; stderr:\n%s", id, interruptLimit, r.stderr.String())
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
}

// blockingPipe returns a pipe in blocking mode, as a shell hands one to a
// program as its stdin (os.Pipe's are non-blocking, which Go's poller can
// wake; a shell's are not).
func blockingPipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	r, w = os.NewFile(uintptr(fds[0]), "stdin"), os.NewFile(uintptr(fds[1]), "pipe-writer")
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

// TestBatchInterruptWhileReading: `(echo JOB; sleep 8) | enqueue -f -
// -wait` interrupted while the pipe stays open stops reading at once and
// ends as an interrupted wait does, naming the job it had enqueued; the
// writer never closes the pipe until the test's end. Both kinds of pipe:
// a shell's (blocking mode) and Go's (non-blocking). Without -wait it
// stops the same way and says how many jobs it enqueued.
func TestBatchInterruptWhileReading(t *testing.T) {
	srv := redistest.StartServer(t)
	rdb, url := srv.New(t)
	pipes := map[string]func(t *testing.T) (r, w *os.File){
		"shell pipe": blockingPipe,
		"go pipe": func(t *testing.T) (r, w *os.File) {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { r.Close(); w.Close() })
			return r, w
		},
	}
	for name, pipe := range pipes {
		for _, wait := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s wait=%v", name, wait), func(t *testing.T) {
				id := strings.ReplaceAll(fmt.Sprintf("held-%s-%v", name, wait), " ", "-")
				r, w := pipe(t)
				if _, err := fmt.Fprintf(w, `{"id":%q,"task_id":"held","command":"true","queue":"nobody"}`+"\n", id); err != nil {
					t.Fatal(err)
				}
				args := []string{"-redis", url, "-f", "-"}
				if wait {
					args = append(args, "-wait")
				}
				run := startRun(t, args, r)
				waitEnqueued(t, rdb, run, id)
				run.interrupt()
				err := run.wait(t, name) // w is still open: the read must not wait for its end
				if !errors.Is(err, errInterrupted) {
					t.Fatalf("err %v, want errInterrupted; stderr:\n%s", err, run.stderr.String())
				}
				if wait && !strings.Contains(err.Error(), "job "+id+" has no result yet") {
					t.Errorf("err %q: want the job enqueued named", err)
				}
				if !wait && (!strings.Contains(err.Error(), "1 jobs were enqueued") || run.stdout.String() != id+"\n") {
					t.Errorf("err %q, stdout %q: want the count of jobs enqueued, and its id on stdout", err, run.stdout.String())
				}
				// The pipe is usable after: its mode unchanged, and a read of
				// it is not stuck in a goroutine of enqueue's.
				if _, err := fmt.Fprintln(w, "after"); err != nil {
					t.Fatal(err)
				}
				w.Close()
				b, err := io.ReadAll(r)
				if err != nil || string(b) != "after\n" {
					t.Errorf("read the pipe after enqueue: %q, %v; want what was written after", b, err)
				}
			})
		}
	}
}

// TestBatchInterruptDuringWait: a -f batch interrupted while it waits
// names the jobs without a result: on stderr when they are few (here 3),
// and in a file named in the message when they are more than 20 (here
// 25), every one of them.
func TestBatchInterruptDuringWait(t *testing.T) {
	srv := redistest.StartServer(t)
	rdb, url := srv.New(t)
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // where the file of ids goes
	for _, n := range []int{3, 25} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			var batch strings.Builder
			var ids []string
			for i := range n {
				id := fmt.Sprintf("out-%d-%02d", n, i)
				ids = append(ids, id)
				fmt.Fprintf(&batch, `{"id":%q,"task_id":"out-%d","command":"true","queue":"nobody"}`+"\n", id, i)
			}
			file := filepath.Join(t.TempDir(), "batch.jsonl")
			if err := os.WriteFile(file, []byte(batch.String()), 0o644); err != nil {
				t.Fatal(err)
			}
			run := startRun(t, []string{"-redis", url, "-f", file, "-wait"}, strings.NewReader(""))
			waitEnqueued(t, rdb, run, ids...)
			run.interrupt()
			err := run.wait(t, "batch")
			if !errors.Is(err, errInterrupted) || !strings.Contains(err.Error(), fmt.Sprintf("%d jobs have no result yet", n)) {
				t.Fatalf("err %v, want the count of jobs without a result; stderr:\n%s", err, run.stderr.String())
			}
			var named string
			if n <= 20 {
				named = run.stderr.String()
			} else {
				_, after, ok := strings.Cut(err.Error(), "their ids are in ")
				path, _, _ := strings.Cut(after, ")")
				if !ok || filepath.Dir(path) != tmp {
					t.Fatalf("err %q: want the file of ids named, in %s", err, tmp)
				}
				b, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				named = string(b)
				if got := strings.Fields(named); strings.Join(got, " ") != strings.Join(ids, " ") {
					t.Errorf("the file %s holds %q, want every id: %q", path, got, ids)
				}
				if strings.Contains(run.stderr.String(), ids[0]) {
					t.Errorf("the ids are in a file, yet stderr lists them:\n%s", run.stderr.String())
				}
			}
			for _, id := range ids {
				if !strings.Contains(named, id+"\n") {
					t.Errorf("job %s is not named; got:\n%s", id, named)
				}
			}
		})
	}
}
