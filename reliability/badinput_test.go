package reliability

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/hibiken/asynq"

	"github.com/boxq/boxq/jobs"
)

// badLine is one line of the bad-input batch: either rejected with an
// error containing wantErr, or accepted and then checked.
type badLine struct {
	name    string
	line    []byte
	wantErr string
	check   func(t *testing.T, r jobs.Result)
}

func jobLine(j jobs.Job) []byte {
	b, err := json.Marshal(j)
	if err != nil {
		panic(err)
	}
	return b
}

// completedWith checks a completed job's output.
func completedWith(output string) func(t *testing.T, r jobs.Result) {
	return func(t *testing.T, r jobs.Result) {
		t.Helper()
		if r.Status != jobs.StatusCompleted || r.ReturnCode != 0 || r.Output != output {
			t.Errorf("%s/%d output %q error %q; want completed/0 %q", r.Status, r.ReturnCode, r.Output, r.Error, output)
		}
	}
}

// TestBadInput sends one batch full of bad input through enqueue -f -wait,
// valid jobs among it: each bad line gets a clear error (with its line
// number) or correct handling, the good jobs complete as if the bad ones
// were not there, and the worker goes on serving.
func TestBadInput(t *testing.T) {
	t.Parallel()
	c := newCluster(t, clusterOptions{gateway: gatewayOptions{isolation: "auto"}})
	c.startWorker(t)

	long := strings.Repeat("x", 1000)
	unicodeID := "タスク-ü-🙂-" + strings.Repeat("é", 10)
	idTask := func(name, task string) badLine {
		return badLine{name: "task id " + name, line: jobLine(jobs.Job{ID: "bad-id-" + name, TaskID: task,
			Command: "echo ok > ~/f && cat ~/f"}), check: completedWith("ok\n")}
	}
	lines := []badLine{
		{name: "good before", line: jobLine(jobs.Job{ID: "good-1", TaskID: "good", Command: "echo one"}), check: completedWith("one\n")},
		{name: "broken JSON", line: []byte(`{"task_id": "x", "command": `), wantErr: "the line ends inside a JSON value"},
		{name: "not an object", line: []byte(`["echo", "hi"]`), wantErr: "a job is a JSON object"},
		{name: "garbage", line: []byte(`echo hi`), wantErr: "a job is a JSON object"},
		{name: "two objects", line: []byte(`{"task_id":"x","command":"true"} {"task_id":"y","command":"true"}`), wantErr: "more than one JSON value"},
		{name: "10 MB command", line: jobLine(jobs.Job{TaskID: "x", Command: "echo " + strings.Repeat("y", 10<<20)}), wantErr: "the limit is 98304"},
		{name: "1 MB command", line: jobLine(jobs.Job{TaskID: "x", Command: strings.Repeat("echo 1; ", 1<<17)}), wantErr: "command is 1048576 bytes; the limit is 98304"},
		{name: "40 MB line", line: append(append([]byte(`{"task_id":"x","command":"`), bytes.Repeat([]byte("z"), 40<<20)...), `"}`...), wantErr: "line is longer than"},
		{name: "invalid UTF-8", line: []byte("{\"task_id\":\"u\",\"command\":\"echo \xff\xfe\"}"), wantErr: "not valid UTF-8"},
		{name: "unknown field", line: []byte(`{"task_id":"x","command":"true","timeout":5}`), wantErr: `unknown field "timeout"`},
		{name: "field name in another case", line: []byte(`{"task_id":"x","Command":"true"}`), wantErr: `field "Command" is spelled "command"`},
		{name: "field given twice", line: []byte(`{"task_id":"x","command":"true","command":"false"}`), wantErr: `field "command" is given twice`},
		{name: "wrong type", line: []byte(`{"task_id":"x","command":["ls","-l"]}`), wantErr: `field "command" must be a string, not an array`},
		{name: "wrong type number", line: []byte(`{"task_id":"x","command":"true","timeout_s":"10"}`), wantErr: `field "timeout_s" must be a number, not a string`},
		{name: "timeout 0", line: []byte(`{"task_id":"x","command":"true","timeout_s":0}`), wantErr: "timeout_s must be a positive number"},
		{name: "timeout negative", line: []byte(`{"task_id":"x","command":"true","timeout_s":-5}`), wantErr: "timeout_s must be a positive number"},
		{name: "timeout under a millisecond", line: []byte(`{"task_id":"x","command":"true","timeout_s":0.0001}`), wantErr: "timeout_s must be at least 0.001"},
		{name: "timeout beyond the sandbox lifetime", line: jobLine(jobs.Job{ID: "bad-long-timeout", TaskID: "timeouts", Command: "echo capped", TimeoutS: ptr(7200.0)}), wantErr: "timeout_s is 7200; the maximum is 3600"},
		{name: "timeout huge", line: []byte(`{"id":"bad-huge-timeout","task_id":"timeouts","command":"echo huge","timeout_s":1e300}`), wantErr: "the maximum is 3600"},
		{name: "stdin over the limit", line: jobLine(jobs.Job{TaskID: "x", Command: "wc -c", Stdin: strings.Repeat("s", jobs.MaxStdinBytes+1)}), wantErr: "stdin is 4194305 bytes; the limit is 4194304"},
		{name: "stdin at the limit", line: jobLine(jobs.Job{ID: "bad-stdin-limit", TaskID: "stdin", Command: "wc -c", Stdin: strings.Repeat("s", jobs.MaxStdinBytes)}), check: completedWith(strconv.Itoa(jobs.MaxStdinBytes) + "\n")},
		{name: "stdin of control bytes at the limit", line: jobLine(jobs.Job{TaskID: "stdin", Command: "wc -c", Stdin: strings.Repeat("\x01", jobs.MaxStdinBytes)}),
			wantErr: "stdin is 4194304 bytes, 25165826 once encoded as JSON for the gateway"},
		{name: "stdin of control bytes that fits", line: jobLine(jobs.Job{ID: "bad-stdin-ctl", TaskID: "stdin", Command: "wc -c", Stdin: strings.Repeat("\x01", 1<<20)}),
			check: completedWith(strconv.Itoa(1<<20) + "\n")},
		{name: "command of quotes near the limit", line: jobLine(jobs.Job{TaskID: "quotes", Command: ": " + strings.Repeat(`"'"`, 30000) + "; echo quoted"}),
			wantErr: "once quoted for the shell (a single quote takes 4); the limit is 131071"},
		{name: "command of quotes that fits", line: jobLine(jobs.Job{ID: "bad-quotes", TaskID: "quotes", Command: ": " + strings.Repeat(`"'"`, 8000) + "; echo quoted"}),
			check: completedWith("quoted\n")},
		idTask("spaces", "task with spaces"),
		idTask("slashes", "a/b/../../c/"),
		idTask("dots", ".."),
		idTask("unicode", unicodeID),
		idTask("1000 characters", long),
		{name: "task id of 1000 unicode characters", line: jobLine(jobs.Job{TaskID: strings.Repeat("é", 1000), Command: "true"}), wantErr: "task_id is 2000 bytes; the limit is 1024"},
		{name: "task id with a newline", line: []byte(`{"task_id":"a\nb","command":"true"}`), wantErr: "task_id must be valid UTF-8 without control characters"},
		{name: "binary output", line: jobLine(jobs.Job{ID: "bad-binary", TaskID: "binary", Command: "head -c 4096 /dev/urandom; printf '\\377\\376'"}), check: func(t *testing.T, r jobs.Result) {
			if r.Status != jobs.StatusCompleted || r.ReturnCode != 0 || !r.OutputInvalidUTF8 || !utf8.ValidString(r.Output) {
				t.Errorf("%s/%d invalid_utf8 %v valid %v; want completed/0, output_invalid_utf8 true, valid text", r.Status, r.ReturnCode, r.OutputInvalidUTF8, utf8.ValidString(r.Output))
			}
		}},
		{name: "latin-1 output", line: jobLine(jobs.Job{ID: "bad-latin1", TaskID: "binary", Command: "printf 'caf\\351\\n'"}), check: func(t *testing.T, r jobs.Result) {
			if r.Output != "caf\uFFFD\n" || !r.OutputInvalidUTF8 {
				t.Errorf("output %q invalid_utf8 %v; want %q and true", r.Output, r.OutputInvalidUTF8, "caf\uFFFD\n")
			}
		}},
		{name: "NUL bytes in output", line: jobLine(jobs.Job{ID: "bad-nul", TaskID: "binary", Command: "printf 'a\\0b'"}), check: func(t *testing.T, r jobs.Result) {
			if r.Output != "a\x00b" || r.OutputInvalidUTF8 {
				t.Errorf("output %q invalid_utf8 %v; want %q and false", r.Output, r.OutputInvalidUTF8, "a\x00b")
			}
		}},
		{name: "utf-8 output", line: jobLine(jobs.Job{ID: "bad-utf8", TaskID: "binary", Command: "echo 'żółw 🐢'"}), check: func(t *testing.T, r jobs.Result) {
			if r.Output != "żółw 🐢\n" || r.OutputInvalidUTF8 {
				t.Errorf("output %q invalid_utf8 %v; want %q and false", r.Output, r.OutputInvalidUTF8, "żółw 🐢\n")
			}
		}},
		{name: "huge binary output", line: jobLine(jobs.Job{ID: "bad-huge-binary", TaskID: "binary", Command: "head -c 3000000 /dev/urandom; echo; echo END"}), check: func(t *testing.T, r jobs.Result) {
			if r.Status != jobs.StatusCompleted || !r.Truncated || !r.OutputInvalidUTF8 || !strings.HasSuffix(r.Output, "END\n") || len(r.Output) > 2<<20 {
				t.Errorf("%s/%d truncated %v invalid_utf8 %v, %d bytes; want completed, truncated, invalid_utf8, ≤ 2 MiB ending END",
					r.Status, r.ReturnCode, r.Truncated, r.OutputInvalidUTF8, len(r.Output))
			}
		}},
		{name: "duplicate id", line: jobLine(jobs.Job{ID: "good-1", TaskID: "good", Command: "echo dup"})}, // one job: see below
		{name: "good after", line: jobLine(jobs.Job{ID: "good-2", TaskID: "good", Command: "echo two"}), check: completedWith("two\n")},
	}

	dir := t.TempDir()
	var in bytes.Buffer
	lineOf := map[int]badLine{}
	n := 0
	for _, l := range lines {
		n++
		lineOf[n] = l
		in.Write(l.line)
		in.WriteString("\n")
		if n == 3 {
			in.WriteString("\n   \n") // blank lines are skipped, but counted
			n += 2
		}
	}
	batchFile, outFile := filepath.Join(dir, "batch.jsonl"), filepath.Join(dir, "results.jsonl")
	if err := os.WriteFile(batchFile, in.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	cli := startProc(t, "enqueue", binary(t, "enqueue"),
		[]string{"-redis", c.redisURL, "-f", batchFile, "-wait", "-o", outFile}, cleanEnv())
	if err := cli.waitExit(3 * time.Minute); err == nil {
		t.Errorf("enqueue exited 0 with bad lines in its batch")
	} else if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Errorf("enqueue: %v, want exit status 1\n%s", err, cli.logs.String())
	}
	stderr := cli.logs.String()
	out, err := os.ReadFile(outFile)
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]jobs.Result{}
	byLine := map[int]jobs.Result{}
	for _, l := range scanLines(out) {
		var r jobs.Result
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("result line is not JSON: %v: %.200q", err, l)
		}
		var k int
		if _, err := fmt.Sscanf(r.Error, "line %d:", &k); err == nil {
			byLine[k] = r
			// Not a job, but a result all the same: an id to tell it
			// by, and a time.
			if r.ID == "" || r.FinishedAt.IsZero() {
				t.Errorf("the result of bad line %d has id %q, finished at %v; want both set", k, r.ID, r.FinishedAt)
			}
			continue
		}
		if _, dup := byID[r.ID]; dup {
			t.Errorf("two results for job %s", r.ID)
		}
		byID[r.ID] = r
	}
	for k := 1; k <= n; k++ {
		l, ok := lineOf[k]
		if !ok {
			continue
		}
		t.Run(l.name, func(t *testing.T) {
			switch {
			case l.wantErr != "":
				r, ok := byLine[k]
				if !ok {
					t.Fatalf("line %d: no error result", k)
				}
				if r.Status != jobs.StatusError || !strings.Contains(r.Error, l.wantErr) {
					t.Errorf("line %d: %s %q; want an error containing %q", k, r.Status, r.Error, l.wantErr)
				}
				if len(r.Error) > 400 {
					t.Errorf("line %d: the error is %d bytes long: %.100q…", k, len(r.Error), r.Error)
				}
				if !strings.Contains(stderr, fmt.Sprintf("line %d: ", k)) {
					t.Errorf("line %d: not reported on stderr", k)
				}
			case l.check != nil:
				var j jobs.Job
				_ = json.Unmarshal(l.line, &j)
				r, ok := byID[j.ID]
				if !ok {
					t.Fatalf("line %d: no result for job %q", k, j.ID)
				}
				l.check(t, r)
			}
		})
	}
	if !strings.Contains(stderr, `job id "good-1" repeats line 1`) {
		t.Errorf("the repeated job id was not reported: %s", stderr)
	}
	if len(byID) != 15 {
		t.Errorf("%d results of jobs; want 15 (the accepted lines but the repeat)", len(byID))
	}

	// The worker took it all in its stride: it still serves.
	b := c.enqueue(t, makeBatch("after-bad", 4, 2, "0"))
	b.collect(t, time.Minute, nil)
	b.checkCompleted(t)
}

// TestBadPayloads puts malformed exec tasks straight on the queue, past the
// producer's checks (another producer, an old version, a hand-made task):
// the worker gives each a clear "error" result at once, without retries,
// and goes on serving.
func TestBadPayloads(t *testing.T) {
	t.Parallel()
	c := newCluster(t, clusterOptions{})
	c.startWorker(t)
	ctx := context.Background()
	w, err := c.prod.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	notify := fmt.Sprintf(`"notify":%q`, w.Channel())
	client := asynq.NewClientFromRedisClient(c.rdb)
	defer client.Close()
	tests := []struct {
		id, payload, want string
	}{
		{"p-not-json", `{"task_id":"x","command":`, "invalid job"},
		{"p-no-command", `{"task_id":"x",` + notify + `}`, "command is required"},
		{"p-big-command", `{"task_id":"x","command":"` + strings.Repeat("y", 1<<20) + `",` + notify + `}`, "the limit is 98304"},
		{"p-bad-utf8", "{\"task_id\":\"x\",\"command\":\"echo \xff\"," + notify + "}", "not valid UTF-8"},
		{"p-zero-timeout", `{"task_id":"x","command":"true","timeout_s":0,` + notify + `}`, "timeout_s must be a positive number"},
		{"p-wrong-type", `{"task_id":"x","command":"true","cpu":"lots",` + notify + `}`, `field "cpu" must be a number, not a string`},
	}
	for _, tt := range tests {
		if _, err := client.Enqueue(asynq.NewTask(jobs.TypeExec, []byte(tt.payload)), asynq.TaskID(tt.id), asynq.MaxRetry(5)); err != nil {
			t.Fatal(err)
		}
		w.Add(jobs.Enqueued{ID: tt.id, Queue: jobs.DefaultQueue})
	}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	got := map[string]jobs.Result{}
	for w.Pending() > 0 {
		r, err := w.Next(rctx)
		if err != nil {
			t.Fatalf("waiting for results (%d in): %v", len(got), err)
		}
		got[r.ID] = r
	}
	insp := asynq.NewInspectorFromRedisClient(c.rdb)
	for _, tt := range tests {
		r := got[tt.id]
		if r.Status != jobs.StatusError || !strings.Contains(r.Error, tt.want) {
			t.Errorf("%s: %s %q; want an error containing %q", tt.id, r.Status, r.Error, tt.want)
		}
		waitFor(t, 10*time.Second, tt.id+" to be archived", func() bool {
			info, err := insp.GetTaskInfo(jobs.DefaultQueue, tt.id)
			return err == nil && info.State == asynq.TaskStateArchived && info.Retried == 0
		})
	}
	b := c.enqueue(t, makeBatch("after-payloads", 4, 2, "0"))
	b.collect(t, time.Minute, nil)
	b.checkCompleted(t)
}

// TestBadCommandLine gives enqueue a 1 MB command and an oversized stdin
// on its command line: usage errors (exit 2) that say what is wrong, and
// nothing enqueued.
func TestBadCommandLine(t *testing.T) {
	t.Parallel()
	c := newCluster(t, clusterOptions{})
	dir := t.TempDir()
	stdinFile, binFile := filepath.Join(dir, "stdin"), filepath.Join(dir, "binary")
	if err := os.WriteFile(stdinFile, bytes.Repeat([]byte("s"), jobs.MaxStdinBytes+10), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(binFile, []byte("PK\x03\x04\xff\x00"), 0o644); err != nil {
		t.Fatal(err)
	}
	// 1 MB in words: one argument may not exceed 128 KiB on Linux.
	words := make([]string, 0, 1<<13)
	for range 1 << 13 {
		words = append(words, strings.Repeat("w", 127))
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"1 MB command", append([]string{"-task", "x", "--"}, words...), "command is 1048575 bytes; the limit is 98304"},
		{"stdin over the limit", []string{"-task", "x", "-stdin-file", stdinFile, "--", "cat"}, "stdin is 4194305 bytes; the limit is 4194304"},
		{"binary stdin", []string{"-task", "x", "-stdin-file", binFile, "--", "cat"}, "stdin is not valid UTF-8 (at byte 4)"},
		{"command not UTF-8", []string{"-task", "x", "--", "echo", "caf\xe9"}, "command is not valid UTF-8 (at byte 8)"},
		{"zero timeout", []string{"-task", "x", "-timeout", "0s", "--", "true"}, "-timeout must be positive"},
		{"task id too long", []string{"-task", strings.Repeat("t", 1025), "--", "true"}, "task_id is 1025 bytes; the limit is 1024"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := startProc(t, "enqueue", binary(t, "enqueue"), append([]string{"-redis", c.redisURL}, tt.args...), cleanEnv())
			err := p.waitExit(time.Minute)
			ee, ok := err.(*exec.ExitError)
			if !ok || ee.ExitCode() != 2 || !strings.Contains(p.logs.String(), tt.want) {
				t.Errorf("enqueue %s: %v\n%.500s\nwant exit status 2 and %q", tt.name, err, p.logs.String(), tt.want)
			}
		})
	}
	if n, err := c.rdb.Keys(context.Background(), "asynq:{default}:t:*").Result(); err != nil || len(n) != 0 {
		t.Errorf("jobs enqueued: %v %v", n, err)
	}
}
