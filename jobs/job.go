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
	"math"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/hibiken/asynq"
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
	MaxTimeout      = time.Hour // the sandbox lifetime: longer timeouts are capped
	MaxTaskIDBytes  = 1024
	MaxJobIDBytes   = 256
	MaxCwdBytes     = 4096
	MaxStdinBytes   = 4 << 20 // the gateway takes request bodies up to 8 MiB
	MaxCommandBytes = 96 << 10
	// maxScriptBytes is Linux's limit on one argv string (MAX_ARG_STRLEN):
	// the wrapped script travels as the argument of bash -c.
	maxScriptBytes = 128<<10 - 1
	DefaultQueue   = "default"
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
}

// ParseJob decodes one job and validates it. Unknown fields are an error,
// so that a misspelt "timeout" does not silently become the default.
func ParseJob(line []byte) (Job, error) {
	var j Job
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&j); err != nil {
		return Job{}, fmt.Errorf("invalid job: %w", describeJSONError(err))
	}
	if dec.More() {
		return Job{}, errors.New("invalid job: more than one JSON value")
	}
	if err := j.Validate(); err != nil {
		return Job{}, err
	}
	return j, nil
}

func describeJSONError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		// ExecPayload embeds Job: report "command", not "Job.command".
		return fmt.Errorf("field %q must be a %s, not a %s", strings.TrimPrefix(te.Field, "Job."), te.Type.String(), te.Value)
	}
	return err
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
	case len(j.Cwd) > MaxCwdBytes || strings.ContainsRune(j.Cwd, 0):
		return bad("cwd must be a path under %d bytes without NUL bytes", MaxCwdBytes)
	case j.TimeoutS != nil && (math.IsNaN(*j.TimeoutS) || *j.TimeoutS <= 0):
		return bad("timeout_s must be a positive number of seconds, got %v", *j.TimeoutS)
	case len(j.Stdin) > MaxStdinBytes:
		return bad("stdin is %d bytes; the limit is %d", len(j.Stdin), MaxStdinBytes)
	case j.CPU < 0 || math.IsNaN(j.CPU):
		return bad("cpu must not be negative")
	case j.MemoryMiB < 0:
		return bad("memory_mib must not be negative")
	case j.DiskMiB < 0:
		return bad("disk_mib must not be negative")
	case j.Queue != "" && (!printable(j.Queue) || strings.ContainsAny(j.Queue, "{}:")):
		return bad("queue %q is not a valid queue name", j.Queue)
	}
	return nil
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
// capped at the sandbox lifetime.
func (j *Job) Timeout() time.Duration {
	if j.TimeoutS == nil {
		return DefaultTimeout
	}
	d := time.Duration(*j.TimeoutS * float64(time.Second))
	if d > MaxTimeout || d <= 0 {
		return MaxTimeout
	}
	return d
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

// NewTerminateTask returns the task that ends taskID's sandbox now.
func NewTerminateTask(taskID string, opts ...asynq.Option) (*asynq.Task, error) {
	if taskID == "" {
		return nil, errors.New("jobs: terminate: task id is required")
	}
	b, err := json.Marshal(TerminatePayload{TaskID: taskID})
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
	ID               string    `json:"id"`
	TaskID           string    `json:"task_id"`
	Status           string    `json:"status"`
	ReturnCode       int       `json:"returncode"`
	Output           string    `json:"output"`
	Cwd              string    `json:"cwd"`
	SandboxID        string    `json:"sandbox_id"`
	ExecID           string    `json:"exec_id"`
	Truncated        bool      `json:"truncated"`
	OutputBytes      int       `json:"output_bytes"`
	SandboxRecreated bool      `json:"sandbox_recreated"`
	Attempts         int       `json:"attempts"`
	QueuedAt         time.Time `json:"queued_at"`
	StartedAt        time.Time `json:"started_at"`
	FinishedAt       time.Time `json:"finished_at"`
	DurationMs       int64     `json:"duration_ms"`
	Error            string    `json:"error"`
}
