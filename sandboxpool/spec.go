package sandboxpool

import (
	"errors"
	"strconv"

	"github.com/boxq/boxq/gateway"
)

// Spec is what a task's sandbox is created with. A sandbox keeps the spec
// it was created with: a later Acquire with another spec gets the existing
// sandbox (Lease.Spec says which spec it has).
type Spec struct {
	Image     string  // default gateway.DefaultImage
	CPU       float64 // default gateway.DefaultCPU
	MemoryMiB int     // default gateway.DefaultMemoryMiB
	DiskMiB   int     // 0: the gateway's default
	// Persistent keeps the sandbox's files across terminate (a snapshot
	// before terminate, restored by the next create of the task). It has
	// no default here: false is a choice; the job layer defaults it.
	Persistent    bool
	Cwd           string // the sandbox's default cwd; default gateway.DefaultCwd
	TimeoutMs     int64  // lifetime; default gateway.DefaultTimeoutMs
	IdleTimeoutMs int64  // the gateway's idle timeout; default gateway.DefaultIdleTimeoutMs
}

// WithDefaults returns s with its zero fields set to the gateway defaults.
func (s Spec) WithDefaults() Spec {
	if s.Image == "" {
		s.Image = gateway.DefaultImage
	}
	if s.CPU == 0 {
		s.CPU = gateway.DefaultCPU
	}
	if s.MemoryMiB == 0 {
		s.MemoryMiB = gateway.DefaultMemoryMiB
	}
	if s.Cwd == "" {
		s.Cwd = gateway.DefaultCwd
	}
	if s.TimeoutMs == 0 {
		s.TimeoutMs = gateway.DefaultTimeoutMs
	}
	if s.IdleTimeoutMs == 0 {
		s.IdleTimeoutMs = gateway.DefaultIdleTimeoutMs
	}
	return s
}

func (s Spec) validate() error {
	if s.CPU < 0 || s.MemoryMiB < 0 || s.DiskMiB < 0 || s.TimeoutMs < 0 || s.IdleTimeoutMs < 0 {
		return errors.New("sandboxpool: spec has a negative size or timeout")
	}
	return nil
}

// request is the gateway create of the task's sandbox; the task id is the
// logical key, under which the gateway keeps a persistent sandbox's files.
func (s Spec) request(taskID string) gateway.CreateRequest {
	return gateway.CreateRequest{
		Image:                s.Image,
		Cwd:                  s.Cwd,
		CPU:                  s.CPU,
		MemoryMiB:            s.MemoryMiB,
		TimeoutMs:            s.TimeoutMs,
		IdleTimeoutMs:        s.IdleTimeoutMs,
		PersistentFilesystem: s.Persistent,
		LogicalKey:           taskID,
		DiskMiB:              s.DiskMiB,
	}
}

// args appends the spec in reserveScript's order.
func (s Spec) args(a []any) []any {
	persistent := "0"
	if s.Persistent {
		persistent = "1"
	}
	return append(a,
		s.Image,
		strconv.FormatFloat(s.CPU, 'g', -1, 64),
		strconv.Itoa(s.MemoryMiB),
		strconv.Itoa(s.DiskMiB),
		persistent,
		s.Cwd,
		strconv.FormatInt(s.TimeoutMs, 10),
		strconv.FormatInt(s.IdleTimeoutMs, 10),
	)
}
