package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/boxq/boxq/jobs"
)

// readmeRun is what one command of the README's "Using it" block printed.
type readmeRun struct {
	stdout, stderr string
	code           int
	dir            string // where it ran
}

// readmeChecks says, for each command of the README's block, what its
// comment promises. A command in the README without a check here, or a
// check without its command, fails the test: the block and the programs
// cannot drift apart.
var readmeChecks = map[string]func(t *testing.T, r readmeRun, jobID *string){
	`enqueue -task t1 -wait -- 'cd /tmp && pwd'`: func(t *testing.T, r readmeRun, _ *string) {
		if r.code != 0 || r.stdout != "/tmp\n" {
			t.Errorf("exit %d, stdout %q; want 0, /tmp", r.code, r.stdout)
		}
	},
	`enqueue -task t1 -wait -- pwd`: func(t *testing.T, r readmeRun, _ *string) {
		if r.code != 0 || r.stdout != "/tmp\n" {
			t.Errorf("exit %d, stdout %q; want 0, /tmp (the cwd carried over)", r.code, r.stdout)
		}
	},
	`enqueue -task t1 -wait -json -- 'exit 3'`: func(t *testing.T, r readmeRun, _ *string) {
		var res jobs.Result
		if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || r.code != 3 || res.ReturnCode != 3 {
			t.Errorf("exit %d, stdout %q (%v); want exit 3 and the result object", r.code, r.stdout, err)
		}
	},
	`echo hello | enqueue -task t1 -wait -stdin-file - -- cat`: func(t *testing.T, r readmeRun, _ *string) {
		if r.code != 0 || r.stdout != "hello\n" {
			t.Errorf("exit %d, stdout %q; want 0, hello", r.code, r.stdout)
		}
	},
	`enqueue -f jobs.jsonl -wait -o results.jsonl`: func(t *testing.T, r readmeRun, _ *string) {
		b, err := os.ReadFile(filepath.Join(r.dir, "results.jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		n := len(demoWant)
		if r.code != 0 || r.stdout != "" || strings.Count(string(b), "\n") != n || !strings.Contains(r.stderr, strconv.Itoa(n)+" results in") {
			t.Errorf("exit %d, stdout %q, %d lines in results.jsonl, stderr %q; want 0, nothing, %d lines and a summary",
				r.code, r.stdout, strings.Count(string(b), "\n"), r.stderr, n)
		}
	},
	`enqueue -f jobs.jsonl -timeout 5m`: func(t *testing.T, r readmeRun, jobID *string) {
		ids := strings.Fields(r.stdout)
		if r.code != 0 || len(ids) != len(demoWant) {
			t.Fatalf("exit %d, stdout %q; want 0 and %d job ids", r.code, r.stdout, len(demoWant))
		}
		for _, id := range ids {
			if _, err := uuid.Parse(id); err != nil {
				t.Errorf("job id %q: %v", id, err)
			}
		}
		*jobID = ids[0]
	},
	`enqueue -result JOB_ID`: func(t *testing.T, r readmeRun, jobID *string) {
		var res jobs.Result
		done := r.code == 0 && json.Unmarshal([]byte(r.stdout), &res) == nil && res.ID == *jobID
		waits := r.code == 1 && strings.Contains(r.stderr, "no result yet")
		if !done && !waits {
			t.Errorf("exit %d, stdout %q, stderr %q; want the result, or what the job waits for", r.code, r.stdout, r.stderr)
		}
	},
	`enqueue -result JOB_ID -wait`: func(t *testing.T, r readmeRun, jobID *string) {
		var res jobs.Result
		if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || r.code != 0 || res.ID != *jobID {
			t.Errorf("exit %d, stdout %q; want the result of %s", r.code, r.stdout, *jobID)
		}
	},
	`enqueue -cancel JOB_ID`: func(t *testing.T, r readmeRun, _ *string) {
		// After -result -wait the job has finished.
		if r.code != 1 || !strings.Contains(r.stderr, "had already finished") {
			t.Errorf("exit %d, stderr %q; want 1: it had finished", r.code, r.stderr)
		}
	},
	`enqueue -terminate -task t1`: func(t *testing.T, r readmeRun, _ *string) {
		if r.code != 0 || !strings.Contains(r.stderr, `task "t1" terminated`) {
			t.Errorf("exit %d, stderr %q; want t1 terminated", r.code, r.stderr)
		}
	},
	`enqueue -terminate -if-idle -task t1`: func(t *testing.T, r readmeRun, _ *string) {
		// Terminated just before: nothing left to end, and it says so.
		if r.code != 0 || !strings.Contains(r.stderr, `task "t1" had no sandbox`) {
			t.Errorf("exit %d, stderr %q; want: no sandbox", r.code, r.stderr)
		}
	},
}

// readmeLine is a command line of a README shell block: the command, then
// its comment.
var readmeLine = regexp.MustCompile(`^(.*?)\s+# (.*)$`)

// TestREADMEExamples runs each command of the README's "Using it" block,
// as shown (jobs.jsonl is examples/demo.jsonl without its ids, JOB_ID the
// first id the fire-and-forget batch printed), against a real Redis,
// reference gateway and worker, and checks what its comment says. It also
// checks the README's count of the demo's result lines.
func TestREADMEExamples(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(readme), "Then, from anywhere that reaches Redis:\n\n```sh\n")
	if !ok {
		t.Fatal("README.md has no \"Then, from anywhere that reaches Redis:\" block")
	}
	block, _, _ := strings.Cut(after, "```")

	s := startStack(t)
	s.startWorker(t)
	dir := t.TempDir()
	writeJobs(t, filepath.Join(dir, "jobs.jsonl"))
	path := binaries(t) + string(os.PathListSeparator) + os.Getenv("PATH")

	seen := map[string]bool{}
	var jobID string
	for line := range strings.Lines(block) {
		m := readmeLine.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			t.Errorf("README line %q: want a command and a comment saying what it prints", line)
			continue
		}
		command := m[1]
		check, ok := readmeChecks[command]
		if !ok {
			t.Errorf("README command %q has no check in readmeChecks", command)
			continue
		}
		seen[command] = true
		ctx, cancel := context.WithTimeout(context.Background(), cliLimit)
		cmd := exec.CommandContext(ctx, "bash", "-c", strings.ReplaceAll(command, "JOB_ID", jobID))
		cmd.Dir = dir
		env := s.env()
		env["PATH"] = path
		cmd.Env = environ(env)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		cancel()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatalf("%s: %v\n%s", command, err, errb.String())
		}
		t.Run(command, func(t *testing.T) {
			check(t, readmeRun{stdout: out.String(), stderr: errb.String(), code: cmd.ProcessState.ExitCode(), dir: dir}, &jobID)
		})
	}
	for command := range readmeChecks {
		if !seen[command] {
			t.Errorf("readmeChecks has %q, which the README no longer shows", command)
		}
	}

	// The compose section and the compose file count the demo's results.
	want := strconv.Itoa(len(demoWant))
	compose, err := os.ReadFile(filepath.Join(repoRoot, composeFile))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "enqueue prints "+want+" result lines") {
		t.Errorf("README.md does not say the compose demo prints %s result lines", want)
	}
	if !strings.Contains(string(compose), "prints the "+want+" results of examples/demo.jsonl") {
		t.Errorf("%s does not say the demo prints %s results", composeFile, want)
	}
}

// writeJobs writes examples/demo.jsonl without its ids, so that the batch
// can be enqueued twice, as the README's block does.
func writeJobs(t *testing.T, path string) {
	t.Helper()
	demo, err := os.ReadFile(demoBatch)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	for line := range strings.Lines(string(demo)) {
		var j map[string]any
		if err := json.Unmarshal([]byte(line), &j); err != nil {
			t.Fatalf("demo line %q: %v", line, err)
		}
		delete(j, "id")
		b, _ := json.Marshal(j)
		out.Write(append(b, '\n'))
	}
	if err := os.WriteFile(path, out.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}
