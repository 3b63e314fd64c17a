// Package jobs holds boxq's asynq task types, their payloads and handlers,
// the worker that serves them and the producer that enqueues them and waits
// for their results.
//
// It follows asynq's "package tasks" shape: a type name per task
// (TypeExec, TypeTerminate, TypeReap), a payload struct per type, a
// constructor per task, and handler structs with ProcessTask.
package jobs

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/hibiken/asynq"

	"github.com/boxq/boxq/wrap"
)

// Task type names.
const (
	TypeExec      = "sandbox:exec"
	TypeTerminate = "sandbox:terminate"
	TypeReap      = "sandbox:reap"
)

// Limits on a job. They exist so that bad input fails at enqueue with a
// clear message instead of deep inside a worker or the gateway.
const (
	DefaultTimeout  = 60 * time.Second
	MinTimeout      = time.Millisecond // the gateway's unit
	MaxTimeout      = time.Hour        // the sandbox lifetime: longer timeouts are capped
	MaxTaskIDBytes  = 1024
	MaxJobIDBytes   = 256
	MaxCwdBytes     = 4096
	MaxStdinBytes   = 4 << 20 // the gateway takes request bodies up to 8 MiB
	MaxCommandBytes = 96 << 10
	// maxScriptBytes is Linux's limit on one argv string (MAX_ARG_STRLEN):
	// the wrapped script travels as the argument of bash -c.
	maxScriptBytes = 128<<10 - 1
	// maxStdinJSONBytes bounds stdin as it travels to the gateway: a JSON
	// string in a request body of at most 8 MiB (the reference gateway's
	// limit), next to the command.
	maxStdinJSONBytes = 7 << 20
	DefaultQueue      = "default"
	// MaintenanceQueue holds boxq's own terminate and reap jobs. Every
	// worker serves it, whatever its -queues, and no exec job may use it.
	MaintenanceQueue = "boxq"
)

// Job is one exec job as producers write it: one JSON object, or one line
// of a JSONL batch. TaskID and Command are required.
type Job struct {
	ID        string   `json:"id,omitempty"`
	TaskID    string   `json:"task_id"`
	Command   string   `json:"command"`
	Cwd       string   `json:"cwd,omitempty"`
	TimeoutS  *float64 `json:"timeout_s,omitempty"`
	Stdin     string   `json:"stdin,omitempty"`
	Image     string   `json:"image,omitempty"`
	CPU       float64  `json:"cpu,omitempty"`
	MemoryMiB int      `json:"memory_mib,omitempty"`
	DiskMiB   int      `json:"disk_mib,omitempty"`
	// Persistent keeps the sandbox's files when it is reaped or terminated,
	// for the next sandbox of the same task. Default true.
	Persistent *bool  `json:"persistent,omitempty"`
	Queue      string `json:"queue,omitempty"`
	// RunAt delays the job: it runs at this time (RFC 3339), and joins its
	// task's sequence only then (delayed.go). A time past runs at once.
	RunAt *time.Time `json:"run_at,omitempty"`
}

// ParseJob decodes one job and validates it. The line must be one JSON
// object in UTF-8; unknown fields are an error, so that a misspelt
// "timeout" does not silently become the default. Every error starts with
// "invalid job: " and says what is wrong in a few words, without echoing a
// long line back.
func ParseJob(line []byte) (Job, error) {
	bad := func(format string, args ...any) (Job, error) {
		return Job{}, fmt.Errorf("invalid job: "+format, args...)
	}
	if !utf8.Valid(line) {
		// encoding/json would quietly turn the bad bytes into U+FFFD,
		// running another command than the one written.
		return bad("the line is not valid UTF-8 (at byte %d); JSON text is UTF-8", invalidUTF8At(line))
	}
	trimmed := bytes.TrimSpace(line)
	if len(trimmed) == 0 {
		return bad("the line is empty")
	}
	if trimmed[0] != '{' {
		return bad("a job is a JSON object ({\"task_id\": …, \"command\": …}), not %s", jsonKindOf(trimmed[0]))
	}
	var j Job
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&j); err != nil {
		return Job{}, fmt.Errorf("invalid job: %w", describeJSONError(err))
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return bad("more than one JSON value on the line (one job per line)")
	}
	if err := checkKeys(line, jobFieldNames); err != nil {
		return Job{}, fmt.Errorf("invalid job: %w", err)
	}
	if err := j.Validate(); err != nil {
		return Job{}, err
	}
	return j, nil
}

// jobFields names the fields of a job, for the message about an unknown one.
const jobFields = "id, task_id, command, cwd, timeout_s, stdin, image, cpu, memory_mib, disk_mib, persistent, queue, run_at"

// checkKeys rejects what encoding/json takes quietly in an object that
// decoded (a job; a schedule, with its names): a field name in another
// case ("Command", matched case-insensitively) and a field given twice
// (the last one wins). Either way the job that would run is not plainly
// the one written.
func checkKeys(line []byte, names []string) error {
	dec := json.NewDecoder(bytes.NewReader(line))
	if _, err := dec.Token(); err != nil { // the '{'
		return nil
	}
	seen := make(map[string]bool, 4)
	for dec.More() {
		tok, err := dec.Token()
		key, ok := tok.(string)
		if err != nil || !ok {
			return nil
		}
		if seen[key] {
			return fmt.Errorf("field %q is given twice", shorten(key, 40))
		}
		seen[key] = true
		if !slices.Contains(names, key) {
			for _, f := range names {
				if strings.EqualFold(f, key) {
					return fmt.Errorf("field %q is spelled %q (field names are lower case)", shorten(key, 40), f)
				}
			}
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return nil
		}
	}
	return nil
}

var jobFieldNames = strings.Split(jobFields, ", ")

// describeJSONError says what is wrong with a job's JSON in a user's terms:
// JSON kinds, not Go types; field names as written in the job.
func describeJSONError(err error) error {
	var (
		te *json.UnmarshalTypeError
		se *json.SyntaxError
		pe *time.ParseError
	)
	switch {
	case errors.As(err, &pe):
		// run_at is a job's only time.
		return fmt.Errorf("field \"run_at\" must be an RFC 3339 time (2026-12-03T03:00:00Z), not %s", shorten(strconv.Quote(pe.Value), 60))
	case errors.As(err, &te):
		// ExecPayload embeds Job: report "command", not "Job.command".
		field := strings.TrimPrefix(te.Field, "Job.")
		got := jsonValueName(te.Value)
		if field == "" {
			return fmt.Errorf("a job is a JSON object, not %s", got)
		}
		return fmt.Errorf("field %q must be %s, not %s", field, goKindInJSON(te.Type.Kind()), got)
	case errors.As(err, &se):
		return fmt.Errorf("not valid JSON at byte %d: %s", se.Offset, strings.TrimPrefix(se.Error(), "json: "))
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return errors.New("the line ends inside a JSON value (a quote or a brace missing?)")
	}
	msg := strings.TrimPrefix(err.Error(), "json: ")
	if strings.HasPrefix(msg, "unknown field ") {
		return fmt.Errorf("%s (the fields are %s)", shorten(msg, 100), jobFields)
	}
	return errors.New(shorten(msg, 200))
}

// goKindInJSON names what a JSON value must be to decode into kind.
func goKindInJSON(kind reflect.Kind) string {
	switch kind {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number"
	case reflect.Struct, reflect.Map:
		return "an object"
	case reflect.Slice, reflect.Array:
		return "an array"
	}
	return "another kind of value"
}

// jsonValueName names the JSON value of a json.UnmarshalTypeError.
func jsonValueName(v string) string {
	switch v {
	case "array":
		return "an array"
	case "object":
		return "an object"
	case "bool":
		return "a boolean"
	}
	if n, ok := strings.CutPrefix(v, "number "); ok {
		return "the number " + shorten(n, 40)
	}
	return "a " + v
}

// jsonKindOf names the JSON value that starts with c.
func jsonKindOf(c byte) string {
	switch {
	case c == '[':
		return "an array"
	case c == '"':
		return "a string"
	case c == 'n':
		return "null"
	case c == 't' || c == 'f':
		return "true or false"
	case c == '-' || (c >= '0' && c <= '9'):
		return "a number"
	}
	return "JSON"
}

// invalidUTF8At returns the offset of the first byte of b that is not
// part of valid UTF-8.
func invalidUTF8At[T string | []byte](b T) int {
	for i := 0; i < len(b); {
		r, n := utf8.DecodeRuneInString(string(b[i:min(i+utf8.UTFMax, len(b))]))
		if r == utf8.RuneError && n == 1 {
			return i
		}
		i += n
	}
	return len(b)
}

// shorten cuts s to at most n bytes (on a rune boundary), marking the cut.
func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// Validate reports the first thing wrong with j, in words a user can act on.
func (j *Job) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("invalid job: "+format, args...)
	}
	switch {
	case j.TaskID == "":
		return bad("task_id is required")
	case len(j.TaskID) > MaxTaskIDBytes:
		return bad("task_id is %d bytes; the limit is %d", len(j.TaskID), MaxTaskIDBytes)
	case !printable(j.TaskID):
		return bad("task_id must be valid UTF-8 without control characters")
	case len(j.ID) > MaxJobIDBytes:
		return bad("id is %d bytes; the limit is %d", len(j.ID), MaxJobIDBytes)
	case j.ID != "" && !printable(j.ID):
		return bad("id must be valid UTF-8 without control characters")
	case strings.TrimSpace(j.Command) == "":
		return bad("command is required")
	case len(j.Command) > MaxCommandBytes:
		return bad("command is %d bytes; the limit is %d (pass large inputs as stdin or files)", len(j.Command), MaxCommandBytes)
	case strings.ContainsRune(j.Command, 0):
		return bad("command contains a NUL byte")
	case !utf8.ValidString(j.Command):
		return bad("command is not valid UTF-8 (at byte %d)", invalidUTF8At(j.Command))
	case len(j.Cwd) > MaxCwdBytes || strings.ContainsRune(j.Cwd, 0) || !utf8.ValidString(j.Cwd):
		return bad("cwd must be a path under %d bytes of UTF-8 without NUL bytes", MaxCwdBytes)
	case j.TimeoutS != nil && (math.IsNaN(*j.TimeoutS) || *j.TimeoutS <= 0):
		return bad("timeout_s must be a positive number of seconds, got %v", *j.TimeoutS)
	case j.TimeoutS != nil && *j.TimeoutS < MinTimeout.Seconds():
		// Below a millisecond the gateway's timeoutMs would be 0: no
		// timeout at all.
		return bad("timeout_s must be at least %v (1 ms), got %v", MinTimeout.Seconds(), *j.TimeoutS)
	case j.TimeoutS != nil && *j.TimeoutS > MaxTimeout.Seconds():
		// Rejected, not capped: a user who asked for more would
		// otherwise find the command cut short without a word.
		return bad("timeout_s is %v; the maximum is %v (%v, the sandbox lifetime)", *j.TimeoutS, MaxTimeout.Seconds(), MaxTimeout)
	case len(j.Stdin) > MaxStdinBytes:
		return bad("stdin is %d bytes; the limit is %d", len(j.Stdin), MaxStdinBytes)
	case !utf8.ValidString(j.Stdin):
		// JSON would carry U+FFFD instead of the bytes given.
		return bad("stdin is not valid UTF-8 (at byte %d): the gateway API carries it as text; send binary data base64-encoded and decode it in the command", invalidUTF8At(j.Stdin))
	case len(j.Stdin) > maxStdinJSONBytes/6 && jsonStringBytes(j.Stdin) > maxStdinJSONBytes:
		return bad("stdin is %d bytes, %d once encoded as JSON for the gateway (a control character takes 6); the limit is %d: send such data base64-encoded",
			len(j.Stdin), jsonStringBytes(j.Stdin), maxStdinJSONBytes)
	case j.CPU < 0 || math.IsNaN(j.CPU):
		return bad("cpu must not be negative")
	case j.MemoryMiB < 0:
		return bad("memory_mib must not be negative")
	case j.DiskMiB < 0:
		return bad("disk_mib must not be negative")
	case j.RunAt != nil && !j.RunAt.Before(parkedAt):
		return bad("run_at %s is too far ahead (before %d, please)", j.RunAt.Format(time.RFC3339), parkedAt.Year())
	case j.Queue != "" && (!printable(j.Queue) || strings.ContainsAny(j.Queue, "{}:")):
		return bad("queue %q is not a valid queue name (no control characters, braces or colons)", shorten(j.Queue, 64))
	case j.Queue == MaintenanceQueue:
		return bad("queue %q is boxq's own, for terminate and reap jobs: use another name", j.Queue)
	}
	if n := scriptBytes(j.Command, j.Cwd); n > maxScriptBytes {
		return bad("command is %d bytes once quoted for the shell (a single quote takes 4); the limit is %d", n, maxScriptBytes)
	}
	return nil
}

// scriptBytes is the size of the script that runs command (wrap.Command),
// for the longest cwd it may start in when cwd is "" (the task's tracked
// one, which the job does not know).
func scriptBytes(command, cwd string) int {
	marker := wrap.Marker(strings.Repeat("0", 32))
	if cwd != "" {
		return len(wrap.Command(command, cwd, marker))
	}
	// The tracked cwd's script (wrap.CommandTracked) around the longest
	// cwd, of which each byte may take 4 once quoted.
	return len(wrap.CommandTracked(command, "/"+strings.Repeat("a", MaxCwdBytes-1), marker)) + 3*MaxCwdBytes
}

// jsonStringBytes is the size of s encoded as a JSON string by
// encoding/json (which also escapes <, > and &).
func jsonStringBytes(s string) int {
	n := 2
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"', c == '\\', c == '\n', c == '\r', c == '\t':
				n += 2
			case c < 0x20, c == '<', c == '>', c == '&':
				n += 6
			default:
				n++
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 || r == '\u2028' || r == '\u2029' {
			n += 6
		} else {
			n += size
		}
		i += size
	}
	return n
}

func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

// Timeout returns the job's command timeout: timeout_s, default 60 s,
// at least MinTimeout, capped at the sandbox lifetime.
func (j *Job) Timeout() time.Duration {
	switch {
	case j.TimeoutS == nil:
		return DefaultTimeout
	case math.IsNaN(*j.TimeoutS) || *j.TimeoutS >= MaxTimeout.Seconds():
		return MaxTimeout
	}
	return max(time.Duration(*j.TimeoutS*float64(time.Second)), MinTimeout)
}

// QueueName returns the asynq queue of the job.
func (j *Job) QueueName() string {
	if j.Queue == "" {
		return DefaultQueue
	}
	return j.Queue
}

// ExecPayload is the payload of a TypeExec task: the job, plus what the
// producer fixes once so that every delivery of the job agrees on it.
type ExecPayload struct {
	Job
	// Nonce makes the cwd marker of this job's script unguessable; fixed at
	// enqueue so that a re-delivered job can parse the output of the exec
	// it re-attaches to.
	Nonce string `json:"nonce,omitempty"`
	// Notify is the Redis channel the result is published on, when a
	// producer waits for it.
	Notify string `json:"notify,omitempty"`
	// QueuedAtMs is when the producer enqueued the job (Unix ms).
	QueuedAtMs int64 `json:"queued_at_ms,omitempty"`
	// Seq says the job is part of its task's sequence in its queue
	// (sequence.go): Producer.Enqueue put it there. A job without it (from
	// another producer) runs when a worker takes it, one at a time with the
	// task's other commands, in no set order.
	Seq bool `json:"seq,omitempty"`
	// JoinOnRun says the job was delayed (Job.RunAt): it was enqueued
	// without joining its task's sequence, and its first delivery, when it
	// falls due, joins it (delayed.go).
	JoinOnRun bool `json:"join_on_run,omitempty"`
}

// execNamespace derives exec ids from job ids (UUID v5): a job has the same
// exec id on every delivery, which is what lets a re-delivered job
// re-attach to its exec instead of starting the command again.
var execNamespace = uuid.MustParse("6f1d2c1e-5b7a-4c43-9a55-0b0c5e1a8d42")

// ExecID returns the stable exec id of a job.
func ExecID(jobID string) string {
	return uuid.NewSHA1(execNamespace, []byte(jobID)).String()
}

// TerminatePayload is the payload of a TypeTerminate task.
type TerminatePayload struct {
	TaskID string `json:"task_id"`
	// IfIdle ends the sandbox only when no command of the task runs or
	// waits; otherwise the terminate job's result says so.
	IfIdle bool `json:"if_idle,omitempty"`
}

// NewExecTask returns the asynq task for p. Options such as asynq.TaskID
// and asynq.Queue are the caller's (see Producer).
func NewExecTask(p ExecPayload, opts ...asynq.Option) (*asynq.Task, error) {
	b, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("jobs: encode exec payload: %w", err)
	}
	return asynq.NewTask(TypeExec, b, opts...), nil
}

// NewTerminateTask returns the task that ends taskID's sandbox now (with
// ifIdle, only if no command of the task runs or waits).
func NewTerminateTask(taskID string, ifIdle bool, opts ...asynq.Option) (*asynq.Task, error) {
	if taskID == "" {
		return nil, errors.New("jobs: terminate: task id is required")
	}
	b, err := json.Marshal(TerminatePayload{TaskID: taskID, IfIdle: ifIdle})
	if err != nil {
		return nil, fmt.Errorf("jobs: encode terminate payload: %w", err)
	}
	return asynq.NewTask(TypeTerminate, b, opts...), nil
}

// NewReapTask returns the task that terminates idle sandboxes.
func NewReapTask(opts ...asynq.Option) *asynq.Task {
	return asynq.NewTask(TypeReap, nil, opts...)
}

// Result statuses. A command's non-zero exit is "completed" with its
// returncode; "error" means the job failed for good and Error says why.
const (
	StatusCompleted = "completed"
	StatusTimeout   = "timeout"
	StatusCancelled = "cancelled"
	StatusError     = "error"
)

// Result is what a job produces: one JSON object, stored with the job in
// Redis and published to a waiting producer.
type Result struct {
	ID          string `json:"id"`
	TaskID      string `json:"task_id"`
	Status      string `json:"status"`
	ReturnCode  int    `json:"returncode"`
	Output      string `json:"output"`
	Cwd         string `json:"cwd"`
	SandboxID   string `json:"sandbox_id"`
	ExecID      string `json:"exec_id"`
	Truncated   bool   `json:"truncated"`
	OutputBytes int    `json:"output_bytes"`
	// OutputInvalidUTF8 says the command printed bytes that are not valid
	// UTF-8 (binary data, another encoding). The gateway API carries output
	// as a JSON string, so each such byte arrives as U+FFFD: Output is text,
	// not the exact bytes (encode binary output in the command, e.g.
	// base64, to get it intact). A command that prints U+FFFD itself also
	// sets it.
	OutputInvalidUTF8 bool `json:"output_invalid_utf8"`
	SandboxRecreated  bool `json:"sandbox_recreated"`
	// CwdReset says the task's tracked working directory was gone (an
	// earlier command deleted it), so the command ran from the sandbox's
	// default directory instead; Error says which directory it was. A cwd
	// the job gives itself that does not exist is rc 126 instead.
	CwdReset bool `json:"cwd_reset,omitempty"`
	// Rescued says a worker other than the one that started the command
	// wrote the result: that one died (or stalled past its lease) while the
	// command ran, and a rescuer collected it (docs/LIFECYCLE.md).
	Rescued    bool      `json:"rescued,omitempty"`
	Attempts   int       `json:"attempts"`
	QueuedAt   time.Time `json:"queued_at"`
	StartedAt  time.Time `json:"started_at"`
	FinishedAt time.Time `json:"finished_at"`
	DurationMs int64     `json:"duration_ms"`
	Error      string    `json:"error"`
}
