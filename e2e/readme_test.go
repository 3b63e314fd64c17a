package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
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

// readmeBlock says what the test does with one shell block of the README:
// run its commands, each against its check, or skip it, saying why. Every
// shell block of the README must have an entry (and every entry its
// block): a new block must be classified.
type readmeBlock struct {
	// skip says why the block cannot run in a test; "" runs it.
	skip string
	// inRepo runs the commands in the repository's root (they name files
	// under examples/); else in a temporary directory holding jobs.jsonl.
	inRepo bool
	// setup prepares what the block's commands need, on the stack.
	setup func(t *testing.T, s *stack)
	// checks holds, for each command of the block, what its comment
	// promises.
	checks map[string]func(t *testing.T, r readmeRun, jobID *string)
}

// readmeBlocks classifies the README's shell blocks, by "heading #n" (the
// n-th shell block under that heading).
var readmeBlocks = map[string]readmeBlock{
	"Two commands #1": {skip: "runs the whole test suite; the -dev batch it shows is TestDev's"},
	"Using it #1":     {skip: "installs packages and starts Redis, the gateway and a worker: the stack this test starts itself"},
	"Using it #2":     {checks: readmeChecks},
	"Scheduled jobs #1": {checks: map[string]func(t *testing.T, r readmeRun, jobID *string){
		`enqueue -in 10m -task t1 -- 'make report'`: func(t *testing.T, r readmeRun, jobID *string) {
			*jobID = strings.TrimSpace(r.stdout)
			if _, err := uuid.Parse(*jobID); r.code != 0 || err != nil {
				t.Errorf("exit %d, stdout %q; want 0 and the job id", r.code, r.stdout)
			}
		},
		`enqueue -at 2026-12-03T03:00:00Z -task t1 -- 'make report'`: func(t *testing.T, r readmeRun, _ *string) {
			// Past or future, the time is taken: a past one runs now.
			if _, err := uuid.Parse(strings.TrimSpace(r.stdout)); r.code != 0 || err != nil {
				t.Errorf("exit %d, stdout %q; want 0 and the job id", r.code, r.stdout)
			}
		},
		`enqueue -result JOB_ID`: func(t *testing.T, r readmeRun, jobID *string) {
			if r.code != 1 || !strings.Contains(r.stderr, "job "+*jobID+" has no result yet") || !strings.Contains(r.stderr, "has no result yet: scheduled (next run ") {
				t.Errorf("exit %d, stderr %q; want 1: no result yet, scheduled", r.code, r.stderr)
			}
		},
		`enqueue -cancel JOB_ID`: func(t *testing.T, r readmeRun, _ *string) {
			if r.code != 0 || !strings.Contains(r.stderr, "cancel requested") {
				t.Errorf("exit %d, stderr %q; want 0, cancel requested", r.code, r.stderr)
			}
		},
	}},
	"Scheduled jobs #2": {inRepo: true, setup: unscheduleAfter, checks: readmeScheduleChecks()},
	"Fan-out #1": {inRepo: true, setup: fanOutTasks, checks: map[string]func(t *testing.T, r readmeRun, jobID *string){
		`enqueue -tasks 'eval-42/*' -wait -- 'git -C ~/repo rev-parse --short HEAD'`: func(t *testing.T, r readmeRun, _ *string) {
			// No repository in these sandboxes: git fails in each, and the
			// summary says so.
			if r.code != 1 || !strings.Contains(r.stdout+r.stderr, "3 tasks: 3 completed (rc 128: 3)") {
				t.Errorf("exit %d, stdout %q, stderr %q; want 1 and a summary of 3 tasks, rc 128", r.code, r.stdout, r.stderr)
			}
		},
		`enqueue -tasks-file examples/fanout-tasks.txt -wait -- 'pwd; ls'`: func(t *testing.T, r readmeRun, _ *string) {
			if r.code != 0 || !strings.Contains(r.stdout+r.stderr, "4 tasks: 4 completed (rc 0: 4)") {
				t.Errorf("exit %d, stdout %q, stderr %q; want 0 and a summary of the 4 tasks of the file", r.code, r.stdout, r.stderr)
			}
		},
		`enqueue -tasks 'eval-42/*' -wait -json -- 'pytest -q'`: func(t *testing.T, r readmeRun, _ *string) {
			lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
			for _, l := range lines {
				var res jobs.Result
				if err := json.Unmarshal([]byte(l), &res); err != nil || !strings.HasPrefix(res.TaskID, "eval-42/") {
					t.Errorf("stdout line %q (%v): want a result of an eval-42 task", l, err)
				}
			}
			if len(lines) != 3 {
				t.Errorf("%d result lines, want 3:\n%s", len(lines), r.stdout)
			}
		},
		`enqueue -tasks 'eval-42/*' -- 'rm -rf ~/.cache'`: func(t *testing.T, r readmeRun, _ *string) {
			ids := strings.Fields(r.stdout)
			for _, id := range ids {
				if _, err := uuid.Parse(id); err != nil {
					t.Errorf("job id %q: %v", id, err)
				}
			}
			if r.code != 0 || len(ids) != 3 {
				t.Errorf("exit %d, stdout %q; want 0 and 3 job ids", r.code, r.stdout)
			}
		},
		`enqueue -terminate -tasks 'eval-42/**'`: func(t *testing.T, r readmeRun, _ *string) {
			if r.code != 0 || !strings.Contains(r.stdout, "(3 tasks): terminated") {
				t.Errorf("exit %d, stdout %q, stderr %q; want the 3 tasks terminated", r.code, r.stdout, r.stderr)
			}
		},
	}},
	"Scheduled jobs #3":      {skip: "curl against a running API: cmd/api's TestSchedulesRoutes sets, lists, runs and removes schedules through these routes"},
	"From Python #1":         {skip: "the API with -dev: cmd/api's tests run it (TestPythonClient)"},
	"From Python #2":         {skip: "pip install of the Python client: TestPythonClient does it offline"},
	"From Python #3":         {skip: "curl against a running API: cmd/api's tests cover its routes (TestRoutesMatchOpenAPI, TestAuthAndErrors)"},
	"How a command runs #1":  {skip: "the script a command is wrapped in, shown, not a command: wrap's golden files and FuzzRoundTrip run it"},
	"With Docker Compose #1": {skip: "Docker: no engine in tests; TestComposeFile runs the compose file's commands and flags"},
	"With Docker Compose #2": {skip: "Docker: no engine in tests; TestComposeFile checks the bwrap overlay"},
	"With Docker Compose #3": {skip: "Docker: no engine in tests; TestComposeFile checks the limits overlay"},
	"Developing #1":          {skip: "the test suite, the fuzzers and the bench themselves"},
}

// readmeScheduleChecks checks the block of recurring schedules: each one
// is taken, -schedules lists them all, -unschedule removes one.
func readmeScheduleChecks() map[string]func(t *testing.T, r readmeRun, jobID *string) {
	taken := func(t *testing.T, r readmeRun, _ *string) {
		if r.code != 0 {
			t.Errorf("exit %d, stdout %q, stderr %q; want 0", r.code, r.stdout, r.stderr)
		}
	}
	checks := map[string]func(t *testing.T, r readmeRun, jobID *string){
		`enqueue -schedules`: func(t *testing.T, r readmeRun, _ *string) {
			for _, name := range []string{"cache-cleanup", "nightly-cleanup", "idle-cleanup", "heartbeat", "report", "disk"} {
				if !strings.Contains(r.stdout, name+" ") {
					t.Errorf("-schedules does not list %s:\n%s", name, r.stdout)
				}
			}
			if r.code != 0 || !strings.HasPrefix(r.stdout, "NAME") {
				t.Errorf("exit %d, stdout %q; want 0 and the table", r.code, r.stdout)
			}
		},
		`enqueue -unschedule heartbeat`: taken,
	}
	for _, c := range []string{
		`enqueue -schedule cache-cleanup -cron '0 2 * * *' -tz Europe/Paris -tasks '**' -- 'rm -rf ~/.cache'`,
		`enqueue -schedule nightly-cleanup -cron '0 3 * * *' -tz Europe/Paris -terminate -tasks '**'`,
		`enqueue -schedule idle-cleanup -cron '@every 30m' -terminate -if-idle -tasks 'eval-*/**'`,
		`enqueue -schedule heartbeat -cron '*/5 * * * *' -task monitor -- 'date >> ~/beats; uptime'`,
		`enqueue -schedule report -cron '@daily' -f examples/nightly-report.json`,
		`enqueue -schedule disk -cron '@hourly' -tasks 'eval-42/*' -- 'df -h / | tail -1'`,
	} {
		checks[c] = taken
	}
	return checks
}

// unscheduleAfter removes, at the end of the block, the schedules it left
// set: their ticks (idle-cleanup at every :00 and :30, disk at every :00,
// heartbeat's */5 until its -unschedule) would otherwise fire in the
// worker during the blocks after, and terminate or add jobs to the
// eval-42 sandboxes whose count Fan-out checks.
func unscheduleAfter(t *testing.T, s *stack) {
	t.Cleanup(func() {
		// heartbeat too, in case the block stopped before its -unschedule.
		for _, name := range []string{"cache-cleanup", "nightly-cleanup", "idle-cleanup", "heartbeat", "report", "disk"} {
			if _, stderr, code := enqueue(t, s, "", "-unschedule", name); code != 0 && !strings.Contains(stderr, "no such schedule") {
				t.Errorf("-unschedule %s after the block: exit %d\n%s", name, code, stderr)
			}
		}
	})
}

// fanOutTasks gives sandboxes to the tasks the Fan-out block names:
// eval-42/0-2, and those of examples/fanout-tasks.txt.
func fanOutTasks(t *testing.T, s *stack) {
	t.Helper()
	var batch strings.Builder
	for _, task := range []string{"eval-42/0", "eval-42/1", "eval-42/2", "demo-a", "demo-b", "demo-c", "demo-d"} {
		fmt.Fprintf(&batch, `{"task_id":%q,"command":"true"}`+"\n", task)
	}
	if stdout, stderr, code := enqueue(t, s, batch.String(), "-f", "-", "-wait"); code != 0 {
		t.Fatalf("the fan-out's tasks: exit %d\n%s\n%s", code, stdout, stderr)
	}
}

// readmeShellBlocks returns the README's shell blocks (sh and bash), by
// "heading #n", and their order.
func readmeShellBlocks(readme string) (map[string]string, []string) {
	blocks := map[string]string{}
	var order []string
	heading := ""
	count := map[string]int{}
	var block strings.Builder
	fence := "" // the opening line of the fenced block we are in, if any
	for line := range strings.Lines(readme) {
		trimmed := strings.TrimRight(line, "\n")
		switch {
		case fence != "" && trimmed == "```":
			if fence == "```sh" || fence == "```bash" {
				count[heading]++
				key := fmt.Sprintf("%s #%d", heading, count[heading])
				blocks[key] = block.String()
				order = append(order, key)
			}
			fence = ""
			block.Reset()
		case fence != "":
			block.WriteString(line)
		case strings.HasPrefix(trimmed, "```"):
			fence = trimmed
		case strings.HasPrefix(trimmed, "#"):
			heading = strings.TrimSpace(strings.TrimLeft(trimmed, "#"))
		}
	}
	return blocks, order
}

// readmeLine is a command line of a README shell block: the command, then
// (optionally) its comment.
var readmeLine = regexp.MustCompile(`^(.*?)(?:\s+# (.*))?$`)

// TestREADMEExamples runs the README's shell blocks that can run in a test
// (readmeBlocks says which, and why the others cannot), each command as
// shown, read from README.md itself, against a real Redis, reference
// gateway and worker, and checks what its comment says. In "Using it",
// jobs.jsonl is examples/demo.jsonl without its ids; JOB_ID is the first
// id a command of the block printed before it. It also checks the
// README's count of the demo's result lines.
func TestREADMEExamples(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	blocks, order := readmeShellBlocks(string(readme))
	if _, ok := blocks["Using it #2"]; !ok || !strings.Contains(string(readme), "Then, from anywhere that reaches Redis:\n\n```sh\n") {
		t.Fatal(`README.md has no "Then, from anywhere that reaches Redis:" block, second under "Using it"`)
	}
	for key := range readmeBlocks {
		if _, ok := blocks[key]; !ok {
			t.Errorf("readmeBlocks has %q, which the README no longer shows", key)
		}
	}

	s := startStack(t)
	s.startWorker(t)
	dir := t.TempDir()
	writeJobs(t, filepath.Join(dir, "jobs.jsonl"))
	path := binaries(t) + string(os.PathListSeparator) + os.Getenv("PATH")

	for _, key := range order {
		b, ok := readmeBlocks[key]
		if !ok {
			t.Errorf("README shell block %q is not in readmeBlocks: run it there with checks, or skip it with the reason\n%s", key, blocks[key])
			continue
		}
		t.Run(key, func(t *testing.T) {
			if b.skip != "" {
				t.Skip(b.skip)
			}
			if b.setup != nil {
				b.setup(t, s)
			}
			runDir := dir
			if b.inRepo {
				runDir = repoRoot
			}
			seen := map[string]bool{}
			var jobID string
			for line := range strings.Lines(blocks[key]) {
				line = strings.TrimSpace(line)
				if line == "" || strings.HasPrefix(line, "#") {
					continue // a comment about the next command
				}
				command := readmeLine.FindStringSubmatch(line)[1]
				check, ok := b.checks[command]
				if !ok {
					t.Errorf("README command %q has no check in readmeBlocks[%q]", command, key)
					continue
				}
				seen[command] = true
				ctx, cancel := context.WithTimeout(context.Background(), cliLimit)
				cmd := exec.CommandContext(ctx, "bash", "-c", strings.ReplaceAll(command, "JOB_ID", jobID))
				cmd.Dir = runDir
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
					check(t, readmeRun{stdout: out.String(), stderr: errb.String(), code: cmd.ProcessState.ExitCode(), dir: runDir}, &jobID)
				})
			}
			for command := range b.checks {
				if !seen[command] {
					t.Errorf("readmeBlocks[%q] checks %q, which the README no longer shows", key, command)
				}
			}
		})
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
