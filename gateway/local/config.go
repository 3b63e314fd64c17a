package local

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"
)

// Isolation says how an exec is separated from the host.
type Isolation string

const (
	// IsolationAuto picks IsolationBwrap when a probe run of bubblewrap
	// works, else IsolationNone, and logs which.
	IsolationAuto Isolation = "auto"
	// IsolationBwrap runs every exec under bubblewrap in fresh namespaces:
	// host root read-only, the sandbox's own writable /root and /tmp, no
	// network, own PID namespace, cleared environment, state dir hidden.
	IsolationBwrap Isolation = "bwrap"
	// IsolationNone runs execs as plain processes in the sandbox's
	// directory with a minimal environment. It is no isolation at all: a
	// command can read and write whatever the gateway's user can.
	IsolationNone Isolation = "none"
)

// Defaults of Config. A zero field means its default.
const (
	DefaultMaxSandboxes    = 64
	DefaultMaxRunningExecs = 2048
	DefaultOutputLimit     = 1 << 20 // 1 MiB
	DefaultStartWait       = 50 * time.Millisecond
	DefaultExecRetention   = 10 * time.Minute
	DefaultJanitorInterval = time.Second
)

// Limits of the API, not configurable: they bound what one request can ask.
const (
	// MaxBodyBytes caps a request body; a larger one gets 413.
	MaxBodyBytes = 8 << 20
	// MaxTimeout caps every timeout of a request (exec timeout, sandbox
	// lifetime, idle timeout); a larger one gets 400.
	MaxTimeout = 24 * time.Hour
)

// Config configures a Server. Only Token is required.
type Config struct {
	// Token is the bearer token every /v1 request must carry. Required.
	Token string

	// StateDir holds the sandboxes' files (StateDir/sandboxes/<id>) and the
	// snapshots kept by logical key (StateDir/snapshots/<name>). It is
	// created if missing and locked against a second server. Leftovers of a
	// previous run's sandboxes are removed at start; snapshots are kept.
	// Empty: a new directory under os.TempDir(), removed by Close, snapshots
	// and all.
	StateDir string

	// Isolation is IsolationAuto (the default), IsolationBwrap (New fails
	// when bubblewrap does not work) or IsolationNone.
	Isolation Isolation

	// BwrapPath is the bubblewrap binary. Default: "bwrap", looked up in PATH.
	BwrapPath string

	// MaxSandboxes caps the live sandboxes; a create beyond it gets 429 with
	// Retry-After. Default DefaultMaxSandboxes (64).
	MaxSandboxes int

	// MaxRunningExecs caps the execs running at once over all sandboxes, so
	// that a flood of starts cannot exhaust the host's processes; a start
	// beyond it gets 429. Default DefaultMaxRunningExecs (2048).
	MaxRunningExecs int

	// OutputLimit caps the output kept per exec, in bytes: the first and
	// the last half are kept and a line in between says how many bytes were
	// cut. Default DefaultOutputLimit (1 MiB).
	OutputLimit int

	// StartWait is how long a start waits for its exec to end before it
	// answers "running". A command that ends within it is answered in the
	// start itself, which saves the client a poll round trip; a longer one
	// costs the client nothing, since its first poll would have waited for
	// the same end. Default DefaultStartWait (50 ms); negative: answer at
	// once.
	StartWait time.Duration

	// ExecRetention is how long a finished exec stays pollable (and its
	// execId stays taken, so a repeated start cannot run it again).
	// Default DefaultExecRetention (10 min).
	ExecRetention time.Duration

	// JanitorInterval is how often idle timeouts, lifetimes and retention
	// are checked. Default DefaultJanitorInterval (1 s); tests set it short.
	JanitorInterval time.Duration

	// Logger receives the server's logs. Default: discard.
	Logger *slog.Logger

	// ImagesDir holds OCI image layouts and image tarballs (docker save,
	// podman save, OCI archives) that a create's image is looked up in.
	// Images need IsolationBwrap and a gateway that can mount (root).
	ImagesDir string
	// Pull lets an image not found in ImagesDir come from its registry.
	Pull bool
	// ImageCacheDir holds the unpacked images. Default StateDir/images.
	ImageCacheDir string
	// ImageDefault is the image of a create that names none. Empty: the
	// host's root.
	ImageDefault string
	// ImageFallbackHost gives an image that cannot be resolved the host's
	// root instead of a 400.
	ImageFallbackHost bool
	// MaxPids caps the processes of one sandbox (cgroup pids). 0: no cap.
	MaxPids int
	// CgroupShim is a binary whose main starts with limits.RunShim (the
	// gateway's own): under cgroup v1 each exec joins its sandbox's
	// cgroups through it. Empty: cgroup v1 is not used (v2 needs no shim).
	CgroupShim string
	// NoCgroups turns the memory, cpu and pids limits off.
	NoCgroups bool

	// Now is the clock of sandbox lifetimes, idle timeouts and retention.
	// Default time.Now. Exec timeouts use real timers.
	Now func() time.Time
}

// withDefaults returns c with every zero field set to its default.
func (c Config) withDefaults() Config {
	if c.Isolation == "" {
		c.Isolation = IsolationAuto
	}
	if c.BwrapPath == "" {
		c.BwrapPath = "bwrap"
	}
	if c.MaxSandboxes == 0 {
		c.MaxSandboxes = DefaultMaxSandboxes
	}
	if c.MaxRunningExecs == 0 {
		c.MaxRunningExecs = DefaultMaxRunningExecs
	}
	if c.OutputLimit == 0 {
		c.OutputLimit = DefaultOutputLimit
	}
	if c.StartWait == 0 {
		c.StartWait = DefaultStartWait
	}
	if c.ExecRetention == 0 {
		c.ExecRetention = DefaultExecRetention
	}
	if c.JanitorInterval == 0 {
		c.JanitorInterval = DefaultJanitorInterval
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

// validate reports what is wrong with a Config that has its defaults.
func (c Config) validate() error {
	var errs []error
	if c.Token == "" {
		errs = append(errs, errors.New("token is empty: every request must be authenticated"))
	}
	switch c.Isolation {
	case IsolationAuto, IsolationBwrap, IsolationNone:
	default:
		errs = append(errs, fmt.Errorf("isolation %q: want %q, %q or %q", c.Isolation, IsolationAuto, IsolationBwrap, IsolationNone))
	}
	if c.MaxSandboxes < 0 {
		errs = append(errs, fmt.Errorf("max sandboxes %d is negative", c.MaxSandboxes))
	}
	if c.MaxRunningExecs < 0 {
		errs = append(errs, fmt.Errorf("max running execs %d is negative", c.MaxRunningExecs))
	}
	if c.OutputLimit < 0 {
		errs = append(errs, fmt.Errorf("output limit %d is negative", c.OutputLimit))
	}
	if c.ExecRetention < 0 {
		errs = append(errs, fmt.Errorf("exec retention %v is negative", c.ExecRetention))
	}
	if (c.ImageDefault != "" || c.ImageFallbackHost) && c.ImagesDir == "" && !c.Pull {
		errs = append(errs, errors.New("an image default or fallback needs an image source (images dir or pull)"))
	}
	if c.MaxPids < 0 {
		errs = append(errs, fmt.Errorf("max pids %d is negative", c.MaxPids))
	}
	if c.JanitorInterval < 0 {
		errs = append(errs, fmt.Errorf("janitor interval %v is negative", c.JanitorInterval))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("local: invalid config: %w", err)
	}
	return nil
}
