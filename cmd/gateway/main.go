// Command gateway is the reference sandbox gateway of boxq: it serves the
// gateway API (create a sandbox, start, poll and cancel execs, terminate)
// backed by sandboxes on this machine, under bubblewrap where it works.
//
// Run gateway -h for its flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/boxq/boxq/gateway/limits"
	"github.com/boxq/boxq/gateway/local"
	"github.com/boxq/boxq/internal/app"
)

// shutdownTimeout bounds a graceful shutdown: killing the execs, ending
// the sandboxes, answering the requests in flight.
const shutdownTimeout = 15 * time.Second

func main() {
	// Under cgroup v1 each exec starts as this binary in shim mode, which
	// joins the sandbox's cgroups and execs bubblewrap (never returns).
	limits.RunShim(os.Args)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// After the first signal, a second one ends the process at once.
	context.AfterFunc(ctx, stop)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	app.Exit("gateway", err, os.Stderr)
}

// defaultStateDir is $XDG_STATE_HOME/boxq/gateway when XDG_STATE_HOME is
// set, else boxq-gateway in the temporary directory.
func defaultStateDir(getenv func(string) string) string {
	if dir := getenv("XDG_STATE_HOME"); dir != "" {
		return filepath.Join(dir, "boxq", "gateway")
	}
	return filepath.Join(os.TempDir(), "boxq-gateway")
}

const helpHead = `gateway — serve the boxq sandbox gateway API, backed by sandboxes on this machine.

Usage:
  gateway [flags]

Each sandbox is a directory tree of its own under -state-dir; each exec runs
bash -c in it, under bubblewrap (fresh namespaces, no network, no capabilities,
only /usr, /bin, /lib*, /etc minus its secrets and /opt of the host, read-only;
as root, commands run as -sandbox-uid) or, with -isolation none, as a plain
process: no isolation at all.

Memory is bounded: at most -max-running-execs execs run (-max-sandbox-running-execs
per sandbox), each keeping -output-limit bytes of output; finished ones are kept
for polls within -exec-retention, -max-retained-execs and -max-retained-bytes,
the oldest dropped first (a poll then gets 404 "expired"; the id never runs again).

Images: with -images DIR or -pull, a create's "image" is resolved (DIR first,
then its registry), unpacked once into -state-dir/images and mounted as the
sandbox's root through a per-sandbox overlay (needs root and bubblewrap); an
image that cannot be resolved is a 400, unless -image-fallback host. Without
an image source the host's root is used, as before. Images must contain bash.

Limits: memoryMiB, cpu and -max-pids are enforced with cgroups (v2 where
delegated, else v1), diskMiB with a per-sandbox tmpfs (its pages are memory:
the memory limit is memoryMiB + diskMiB); both need root. What cannot be enforced is logged at start, and
GET /v1/sandboxes says per sandbox which limits hold. Under cgroup v1 each exec
moves into its cgroups, which on an idle host waits ≈10 ms for the kernel
(an RCU grace period) unless its cgroup favordynmods is on: the gateway turns
it on from the first sandbox with a limit until it ends (-cgroup-favordynmods=false:
leave the kernel as it is).

Environment:
  GATEWAY_TOKEN    the bearer token clients must send, when -token is not given
  XDG_STATE_HOME   when set, the default -state-dir is $XDG_STATE_HOME/boxq/gateway
`

const helpTail = `
Examples:
  GATEWAY_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n') gateway
  GATEWAY_TOKEN=secret gateway -addr 0.0.0.0:8085 -isolation bwrap -state-dir /var/lib/boxq-gateway
  GATEWAY_TOKEN=dev gateway -isolation none -log-format text -log-level debug
`

// run is the whole command: it serves until ctx is done, then shuts down.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("gateway", flag.ContinueOnError)
	var (
		addr         = fs.String("addr", "127.0.0.1:8085", "listen `address`")
		token        = fs.String("token", "", "bearer `token` clients must send (default $GATEWAY_TOKEN; prefer it: a flag shows in ps)")
		stateDir     = fs.String("state-dir", defaultStateDir(getenv), "`dir`ectory of the sandboxes' files and snapshots")
		isolation    = fs.String("isolation", string(local.IsolationAuto), "auto, bwrap or none: bwrap runs each exec in fresh namespaces; none is no isolation at all; auto is bwrap where it works")
		maxSandboxes = fs.Int("max-sandboxes", local.DefaultMaxSandboxes, "live sandboxes at most; a create beyond gets 429")
		outputLimit  = fs.Int("output-limit", local.DefaultOutputLimit, "output `bytes` kept per exec: the head and the tail, with what was cut in between")
		imagesDir    = fs.String("images", "", "`dir`ectory of OCI image layouts and image tarballs (docker save, podman save, OCI archives) that a create's image is looked up in, by tag")
		pull         = fs.Bool("pull", false, "pull an image not found in -images from its registry")
		imageDefault = fs.String("image-default", "", "image `name` of a create that names none (default: the host's root)")
		imageFallbk  = fs.String("image-fallback", "", "`mode`: host gives an image that cannot be resolved the host's root instead of a 400")
		maxPids      = fs.Int("max-pids", 0, "processes per sandbox at most (cgroup pids; 0: no cap)")
		favorDyn     = fs.Bool("cgroup-favordynmods", true, "under cgroup v1, as root: turn the kernel's cgroup favordynmods on from the first sandbox with a limit until the gateway ends, so that an exec's move into its cgroups waits for no RCU grace period (≈10 ms on an idle host); forks and exits host-wide pay an atomic operation more")
		startWait    = fs.Duration("start-wait", local.DefaultStartWait, "how long a start waits for its exec to end before it answers running; 0: always answer running at once, as a hosted gateway does")
		maxRunning   = fs.Int("max-running-execs", local.DefaultMaxRunningExecs, "execs running at once over all sandboxes; a start beyond gets 429")
		maxSbRunning = fs.Int("max-sandbox-running-execs", local.DefaultMaxSandboxRunningExecs, "execs running at once in one sandbox; a start beyond gets 429")
		retention    = fs.Duration("exec-retention", local.DefaultExecRetention, "how long a finished exec's result is kept for polls, at most")
		maxRetained  = fs.Int("max-retained-execs", local.DefaultMaxRetainedExecs, "finished execs kept for polls; beyond, the oldest is dropped and a poll of it gets 404 expired")
		maxRetBytes  = fs.Int64("max-retained-bytes", local.DefaultMaxRetainedBytes, "`bytes` of finished execs' answers kept for polls; beyond, the oldest is dropped")
		sandboxUID   = fs.Int("sandbox-uid", local.DefaultSandboxUID, "as root under bwrap: the `uid` commands run as (no /etc/passwd entry needed; not 0); bwrap runs as it, unprivileged, so the host must allow unprivileged user namespaces")
		sandboxGID   = fs.Int("sandbox-gid", local.DefaultSandboxGID, "as root under bwrap: the `gid` commands run as (not 0)")
		logFormat    = fs.String("log-format", "auto", "auto, text or json: auto is coloured text on a terminal, JSON otherwise")
		logLevel     = fs.String("log-level", "info", "debug, info, warn or error")
	)
	if err := app.ParseFlags(fs, args, stdout, helpHead, helpTail); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return app.Usagef("unexpected arguments %q: gateway takes flags only", fs.Args())
	}
	if *token == "" {
		*token = getenv("GATEWAY_TOKEN")
	}
	if *token == "" {
		return app.Usagef("no token: set GATEWAY_TOKEN (or pass -token) to the bearer token clients must send")
	}
	mode := local.Isolation(*isolation)
	switch mode {
	case local.IsolationAuto, local.IsolationBwrap, local.IsolationNone:
	default:
		return app.Usagef("-isolation %q: want auto, bwrap or none", *isolation)
	}
	if *maxSandboxes < 1 {
		return app.Usagef("-max-sandboxes %d: want at least 1", *maxSandboxes)
	}
	if *outputLimit < 1 {
		return app.Usagef("-output-limit %d: want at least 1 byte", *outputLimit)
	}
	switch {
	case *startWait < 0:
		return app.Usagef("-start-wait %v: want 0 or more", *startWait)
	case *maxRunning < 1:
		return app.Usagef("-max-running-execs %d: want at least 1", *maxRunning)
	case *maxSbRunning < 1:
		return app.Usagef("-max-sandbox-running-execs %d: want at least 1", *maxSbRunning)
	case *retention <= 0:
		return app.Usagef("-exec-retention %v: want more than 0", *retention)
	case *maxRetained < 1:
		return app.Usagef("-max-retained-execs %d: want at least 1", *maxRetained)
	case *maxRetBytes < 1:
		return app.Usagef("-max-retained-bytes %d: want at least 1", *maxRetBytes)
	case *sandboxUID < 1 || *sandboxGID < 1:
		return app.Usagef("-sandbox-uid %d, -sandbox-gid %d: want ids above 0: commands must not run as root", *sandboxUID, *sandboxGID)
	}
	if *imageFallbk != "" && *imageFallbk != "host" {
		return app.Usagef("-image-fallback %q: the only fallback is host", *imageFallbk)
	}
	if *maxPids < 0 {
		return app.Usagef("-max-pids %d: want 0 (no cap) or more", *maxPids)
	}
	shim, err := os.Executable()
	if err != nil {
		return fmt.Errorf("own executable, for the cgroup v1 shim: %w", err)
	}
	logger, err := app.NewLogger(stderr, *logFormat, *logLevel)
	if err != nil {
		return app.Usagef("%v", err)
	}

	srv, err := local.New(local.Config{
		Token:        *token,
		StateDir:     *stateDir,
		Isolation:    mode,
		MaxSandboxes: *maxSandboxes,
		OutputLimit:  *outputLimit,

		ImagesDir:         *imagesDir,
		Pull:              *pull,
		ImageDefault:      *imageDefault,
		ImageFallbackHost: *imageFallbk == "host",
		MaxPids:           *maxPids,
		CgroupShim:        shim,
		NoFavorDynMods:    !*favorDyn,
		// The flag's 0 is "no wait"; the config's is "the default".
		StartWait:              local.StartWaitFlag(*startWait),
		MaxRunningExecs:        *maxRunning,
		MaxSandboxRunningExecs: *maxSbRunning,
		ExecRetention:          *retention,
		MaxRetainedExecs:       *maxRetained,
		MaxRetainedBytes:       *maxRetBytes,
		SandboxUID:             *sandboxUID,
		SandboxGID:             *sandboxGID,
		Logger:                 logger,
	})
	if err != nil {
		return err
	}
	closeCtx := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		cctx, cancel := closeCtx()
		defer cancel()
		return errors.Join(fmt.Errorf("listen: %w", err), srv.Close(cctx))
	}
	httpSrv := &http.Server{
		Handler:           srv.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	logger.Info("listening", "addr", ln.Addr().String(), "state_dir", srv.StateDir(), "isolation", srv.Isolation())

	served := make(chan error, 1)
	go func() { served <- httpSrv.Serve(ln) }()
	select {
	case err := <-served:
		cctx, cancel := closeCtx()
		defer cancel()
		return errors.Join(fmt.Errorf("serve: %w", err), srv.Close(cctx))
	case <-ctx.Done():
	}

	logger.Info("shutting down")
	cctx, cancel := closeCtx()
	defer cancel()
	// Shutdown stops accepting at once and waits for the requests in
	// flight; Close, meanwhile, kills the execs, which ends the long polls
	// among those requests.
	shut := make(chan error, 1)
	go func() { shut <- httpSrv.Shutdown(cctx) }()
	closeErr := srv.Close(cctx)
	shutErr := <-shut
	<-served // http.ErrServerClosed, now that Shutdown has run
	if err := errors.Join(closeErr, shutErr); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	logger.Info("stopped")
	return nil
}
