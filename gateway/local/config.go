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
	DefaultMaxRunningExecs = 1024
	// A sandbox is one task's: a few execs at once is its normal load.
	DefaultMaxSandboxRunningExecs = 64
	DefaultMaxRetainedExecs       = 4096
	DefaultMaxRetainedBytes       = 256 << 20 // 256 MiB
	DefaultMaxTombstones          = 256 << 10
	DefaultOutputLimit            = 1 << 20 // 1 MiB
	DefaultStartWait              = 50 * time.Millisecond
	DefaultExecRetention          = 10 * time.Minute
	DefaultJanitorInterval        = time.Second
	DefaultSandboxUID             = 65534
	DefaultSandboxGID             = 65534
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

	// SandboxUID and SandboxGID are who commands run as under bubblewrap
	// when the gateway runs as root: bubblewrap is started as that user,
	// unprivileged, and the sandboxes' files are theirs. Any ids will do,
	// with or without an /etc/passwd entry; not 0. Default
	// DefaultSandboxUID and DefaultSandboxGID (65534, nobody). A gateway
	// that is not root runs commands as itself.
	SandboxUID int
	SandboxGID int

	// BwrapPath is the bubblewrap binary. Default: "bwrap", looked up in PATH.
	BwrapPath string

	// MaxSandboxes caps the live sandboxes; a create beyond it gets 429 with
	// Retry-After. Default DefaultMaxSandboxes (64).
	MaxSandboxes int

	// MaxRunningExecs caps the execs running at once over all sandboxes, so
	// that a flood of starts cannot exhaust the host's processes; a start
	// beyond it gets 429. Default DefaultMaxRunningExecs (1024).
	MaxRunningExecs int

	// MaxSandboxRunningExecs caps the execs running at once in one
	// sandbox; a start beyond it gets 429. Default
	// DefaultMaxSandboxRunningExecs (64).
	MaxSandboxRunningExecs int

	// MaxRetainedExecs and MaxRetainedBytes cap the finished execs kept
	// for polls, over all sandboxes, by number and by the size of their
	// encoded answers: beyond either, the oldest is forgotten before its
	// ExecRetention is up, and a poll of it gets 404 "expired". Defaults
	// DefaultMaxRetainedExecs (4096) and DefaultMaxRetainedBytes (256 MiB).
	MaxRetainedExecs int
	MaxRetainedBytes int64

	// MaxTombstones caps the ids of forgotten execs kept so that none of
	// them runs again (a start with one gets 409) while its sandbox
	// lives: 16 bytes and a map entry each. Beyond it the oldest go.
	// Default DefaultMaxTombstones (256 Ki, some 16 MiB when full).
	MaxTombstones int

	// OutputLimit caps the output kept per exec, in bytes: the first and
	// the last half are kept and a line in between says how many bytes were
	// cut. While the exec runs, what it keeps beyond 64 KiB waits in an
	// unlinked file in StateDir/run, not in memory. Default
	// DefaultOutputLimit (1 MiB).
	OutputLimit int

	// StartWait is how long a start waits for its exec to end before it
	// answers "running". A command that ends within it is answered in the
	// start itself, which saves the client a poll round trip; a longer one
	// costs the client nothing, since its first poll would have waited for
	// the same end. Default DefaultStartWait (50 ms); negative: answer at
	// once, "running", as a hosted gateway does (see StartWaitFlag for
	// the flag's reading, where 0 means that).
	StartWait time.Duration

	// ExecRetention is how long a finished exec stays pollable, at most
	// (see MaxRetainedExecs). Its execId stays taken after that, as a
	// tombstone, for as long as its sandbox lives (see MaxTombstones), so a
	// repeated start cannot run it again. Default DefaultExecRetention
	// (10 min).
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
	// gateway's own). Under cgroup v1 each exec joins its sandbox's cgroups
	// through a shim: a /bin/sh script by default, this binary where the
	// sandbox user cannot run /bin/sh. Empty: the sh shim only (v2 needs
	// no shim).
	CgroupShim string
	// NoCgroups turns the memory, cpu and pids limits off.
	NoCgroups bool
	// NoFavorDynMods leaves the kernel's cgroup favordynmods as it is.
	// By default a gateway that enforces limits under cgroup v1 turns it
	// on from its first sandbox with a limit until it ends
	// (gateway/limits, favor.go): otherwise each exec's
	// move into its cgroups waits for an RCU grace period, ≈10 ms on an
	// idle host.
	NoFavorDynMods bool

	// Now is the clock of sandbox lifetimes, idle timeouts and retention.
	// Default time.Now. Exec timeouts use real timers.
	Now func() time.Time
}

// StartWaitFlag turns the value of a -start-wait flag, where 0 means "answer
// every start at once" (no wait), into Config.StartWait, where 0 means the
// default and a negative value means no wait.
func StartWaitFlag(d time.Duration) time.Duration {
	if d <= 0 {
		return -1
	}
	return d
}

// withDefaults returns c with every zero field set to its default.
func (c Config) withDefaults() Config {
	if c.Isolation == "" {
		c.Isolation = IsolationAuto
	}
	if c.BwrapPath == "" {
		c.BwrapPath = "bwrap"
	}
	if c.SandboxUID == 0 {
		c.SandboxUID = DefaultSandboxUID
	}
	if c.SandboxGID == 0 {
		c.SandboxGID = DefaultSandboxGID
	}
	if c.MaxSandboxes == 0 {
		c.MaxSandboxes = DefaultMaxSandboxes
	}
	if c.MaxRunningExecs == 0 {
		c.MaxRunningExecs = DefaultMaxRunningExecs
	}
	if c.MaxSandboxRunningExecs == 0 {
		c.MaxSandboxRunningExecs = DefaultMaxSandboxRunningExecs
	}
	if c.MaxRetainedExecs == 0 {
		c.MaxRetainedExecs = DefaultMaxRetainedExecs
	}
	if c.MaxRetainedBytes == 0 {
		c.MaxRetainedBytes = DefaultMaxRetainedBytes
	}
	if c.MaxTombstones == 0 {
		c.MaxTombstones = DefaultMaxTombstones
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
	if c.SandboxUID < 0 || c.SandboxGID < 0 {
		errs = append(errs, fmt.Errorf("sandbox uid %d, gid %d: want positive ids", c.SandboxUID, c.SandboxGID))
	}
	if c.MaxSandboxes < 0 {
		errs = append(errs, fmt.Errorf("max sandboxes %d is negative", c.MaxSandboxes))
	}
	if c.MaxRunningExecs < 0 {
		errs = append(errs, fmt.Errorf("max running execs %d is negative", c.MaxRunningExecs))
	}
	if c.MaxSandboxRunningExecs < 0 {
		errs = append(errs, fmt.Errorf("max running execs per sandbox %d is negative", c.MaxSandboxRunningExecs))
	}
	if c.MaxRetainedExecs < 0 {
		errs = append(errs, fmt.Errorf("max retained execs %d is negative", c.MaxRetainedExecs))
	}
	if c.MaxRetainedBytes < 0 {
		errs = append(errs, fmt.Errorf("max retained bytes %d is negative", c.MaxRetainedBytes))
	}
	if c.MaxTombstones < 0 {
		errs = append(errs, fmt.Errorf("max tombstones %d is negative", c.MaxTombstones))
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
