package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/internal/syncbuf"
	"github.com/boxq/boxq/jobs"
)

// TestBatchCtrlCWhileReadingPipe: `(echo JOB; sleep …) | enqueue -f -
// -wait`, given SIGINT while the pipe stays open, stops reading at once and
// ends as an interrupted wait does: exit 1, the job it enqueued named. The
// program's stdin is a real pipe in blocking mode, as a shell gives, whose
// writer the test holds open until enqueue has exited.
func TestBatchCtrlCWhileReadingPipe(t *testing.T) {
	srv := redistest.StartServer(t)
	rdb, url := srv.New(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	cmd := exec.Command(filepath.Join(binaries(t), progEnqueue), "-f", "-", "-wait")
	cmd.Env = environ(map[string]string{"REDIS_URL": url})
	cmd.Stdin = r // handed over as it is: exec makes it blocking
	var out syncbuf.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r.Close()
	done := make(chan struct{}) // closed once enqueue has exited
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	defer func() {
		select {
		case <-done:
		default:
			_ = cmd.Process.Kill()
			<-done
		}
	}()
	const id = "ctrl-c-1"
	if _, err := fmt.Fprintf(w, `{"id":%q,"task_id":"cc","command":"true","queue":"nobody"}`+"\n", id); err != nil {
		t.Fatal(err)
	}
	prod, err := jobs.NewProducer(rdb, jobs.ProducerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.After(cliLimit)
	for {
		if _, err := prod.Status(context.Background(), id); err == nil {
			break
		}
		select {
		case <-done:
			t.Fatalf("enqueue exited (%v) before it enqueued the job:\n%s", cmd.ProcessState, out.String())
		case <-deadline:
			t.Fatalf("job %s not enqueued within %v:\n%s", id, cliLimit, out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(cliLimit):
		t.Fatalf("enqueue still reads its open pipe %v after SIGINT:\n%s", cliLimit, out.String())
	}
	if code := cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(out.String(), "job "+id+" has no result yet: interrupted") {
		t.Errorf("exit %d, want 1 and the job named:\n%s", code, out.String())
	}
}

// TestRedisDownOneMessage: one job against a port where no Redis listens
// prints one line that says Redis cannot be reached, and nothing of
// go-redis's own logger (its "pool.go:…" lines went to stderr before it).
func TestRedisDownOneMessage(t *testing.T) {
	addr := freeAddr(t)
	for _, args := range [][]string{
		{"-task", "t", "-wait", "--", "true"},
		{"-task", "t", "--", "true"},
		{"-f", "-", "-wait"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), cliLimit)
			defer cancel()
			stdout, stderr, code := run(ctx, t, append([]string{progEnqueue}, args...), map[string]string{"REDIS_URL": "redis://" + addr + "/0"})
			if code != 1 || stdout != "" || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "cannot reach Redis") || strings.Contains(stderr, "pool.go") {
				t.Errorf("exit %d, stdout %q, stderr %q; want 1 and one line: cannot reach Redis", code, stdout, stderr)
			}
		})
	}
}
