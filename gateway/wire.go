// Package gateway speaks the sandbox gateway's HTTP API: create a sandbox,
// start an exec in it, poll the exec, cancel it, terminate the sandbox.
//
// The wire types in this file are shared by the client (Client) and the
// reference server (gateway/local), so both sides agree on every field name.
package gateway

// Exec statuses. Running means "keep polling"; the other four are terminal.
const (
	StatusRunning   = "running"
	StatusCompleted = "completed" // exit 0
	StatusFailed    = "failed"    // non-zero exit
	StatusTimeout   = "timeout"   // rc 124
	StatusCancelled = "cancelled" // rc 130
)

// Return codes the gateway and the client use for the non-exit outcomes.
const (
	ReturnCodeTimeout   = 124
	ReturnCodeCancelled = 130
)

// Terminal reports whether status ends an exec.
func Terminal(status string) bool {
	switch status {
	case StatusCompleted, StatusFailed, StatusTimeout, StatusCancelled:
		return true
	}
	return false
}

// CreateRequest is the body of POST /v1/sandboxes.
type CreateRequest struct {
	Image                string  `json:"image"`
	Cwd                  string  `json:"cwd"`
	CPU                  float64 `json:"cpu"`
	MemoryMiB            int     `json:"memoryMiB"`
	TimeoutMs            int64   `json:"timeoutMs"`
	IdleTimeoutMs        int64   `json:"idleTimeoutMs"`
	PersistentFilesystem bool    `json:"persistentFilesystem"`
	LogicalKey           string  `json:"logicalKey"`
	DiskMiB              int     `json:"diskMiB,omitempty"`
}

// Defaults of a create, as the Python client sends them.
const (
	DefaultImage         = "python:3.11"
	DefaultCwd           = "/root"
	DefaultCPU           = 1
	DefaultMemoryMiB     = 5120
	DefaultTimeoutMs     = 3_600_000 // sandbox lifetime: 1 h
	DefaultIdleTimeoutMs = 300_000   // 5 min
)

// CreateResponse is the answer to a create.
type CreateResponse struct {
	ID string `json:"id"`
}

// StartRequest is the body of POST /v1/sandboxes/{id}/execs.
type StartRequest struct {
	ExecID    string `json:"execId"`
	Command   string `json:"command"`
	Cwd       string `json:"cwd,omitempty"`
	TimeoutMs int64  `json:"timeoutMs"`
	StdinData string `json:"stdinData,omitempty"`
}

// ExecState is the answer to a start or a poll. ReturnCode is a pointer
// because the API allows it to be missing or null, which means 1.
type ExecState struct {
	ExecID     string `json:"execId"`
	Status     string `json:"status"`
	Output     string `json:"output"`
	ReturnCode *int   `json:"returncode"`
	// OutputOmitted, an extension of the reference gateway, is how many
	// bytes of the output it cut (0: none), where a line
	// "[... N bytes omitted ...]" stands; set on a terminal state. Without
	// it, a reader can only guess the cut from that line, which the command
	// may have printed itself.
	OutputOmitted *int64 `json:"outputOmittedBytes,omitempty"`
}

// RC returns the exec's return code, 1 when the gateway sent none.
func (s ExecState) RC() int {
	if s.ReturnCode == nil {
		return 1
	}
	return *s.ReturnCode
}

// TerminateRequest is the body of POST /v1/sandboxes/{id}/terminate.
type TerminateRequest struct {
	SnapshotBeforeTerminate bool `json:"snapshotBeforeTerminate"`
}

// StatusResponse is the answer to cancel and terminate.
type StatusResponse struct {
	Status string `json:"status"`
}

// ErrorBody is the JSON body of every error answer.
type ErrorBody struct {
	Error string `json:"error"`
}

// SandboxInfo is one entry of GET /v1/sandboxes (an extension of the
// reference gateway, not part of the hosted API).
type SandboxInfo struct {
	ID           string `json:"id"`
	LogicalKey   string `json:"logicalKey"`
	Status       string `json:"status"`
	CreatedAt    string `json:"createdAt"`
	LastActiveAt string `json:"lastActiveAt"`
	RunningExecs int    `json:"runningExecs"`
	// The image the create named, and whether it is the sandbox's root
	// (else ImageNote says why the host's root is).
	Image        string `json:"image,omitempty"`
	ImageApplied bool   `json:"imageApplied"`
	ImageDigest  string `json:"imageDigest,omitempty"`
	ImageNote    string `json:"imageNote,omitempty"`
	// Limits says which of the sandbox's limits are enforced.
	Limits *SandboxLimits `json:"limits,omitempty"`
}

// SandboxLimits says which limits of a sandbox hold (true) and which the
// gateway cannot enforce or were not asked for (false).
type SandboxLimits struct {
	Memory bool `json:"memory"`
	CPU    bool `json:"cpu"`
	Pids   bool `json:"pids"`
	Disk   bool `json:"disk"`
}

// ImageInfo is one entry of GET /v1/images (an extension of the reference
// gateway): an image unpacked in its cache.
type ImageInfo struct {
	Digest     string   `json:"digest"`
	Refs       []string `json:"refs"`
	Source     string   `json:"source"`
	Bytes      int64    `json:"bytes"`
	UnpackedAt string   `json:"unpackedAt"`
}

// ImagesResponse is the answer to GET /v1/images.
type ImagesResponse struct {
	Images []ImageInfo `json:"images"`
}

// ListResponse is the answer to GET /v1/sandboxes.
type ListResponse struct {
	Sandboxes []SandboxInfo `json:"sandboxes"`
}

// WaitParam is the query parameter of a long poll: GET …/execs/{id}?waitMs=N.
const WaitParam = "waitMs"

// MaxWaitMs caps a long poll.
const MaxWaitMs = 30_000
