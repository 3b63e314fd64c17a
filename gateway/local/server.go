// Package local is the reference sandbox gateway: a server for the gateway
// API (see package gateway) backed by sandboxes on the local machine.
//
// Each sandbox is a directory tree of its own under the state dir; each
// exec runs `bash -c` in it, under bubblewrap (IsolationBwrap) or as a
// plain process (IsolationNone, no isolation at all).
//
// What the server does beyond the wire format:
//   - A create's timeoutMs is the sandbox's lifetime (0: 1 h) and its
//     idleTimeoutMs the time it may go without a running exec (0: 5 min);
//     both at most 24 h. image, cpu, memoryMiB and diskMiB apply where
//     the gateway can: images with an image source (Config.ImagesDir,
//     Pull), limits with cgroups and mounts (root); see runtime.go. What
//     cannot be enforced is logged at start and shown per sandbox by
//     GET /v1/sandboxes.
//   - The same x-idempotency-key gives the same sandbox id, also to
//     concurrent creates, until ExecRetention after that sandbox ended.
//   - An exec's timeoutMs (0: none but the sandbox's lifetime) kills its
//     whole process group: status timeout, rc 124. A cancel kills it the
//     same way: cancelled, rc 130. Processes an exec leaves behind end
//     with it (under bubblewrap all of them; without, those still in its
//     process group). A start with a known execId answers that exec's
//     state and runs nothing.
//   - When the gateway itself ends a sandbox (idle, lifetime, Close), a
//     persistent one with a logical key keeps its files as a snapshot, as
//     a terminate with snapshotBeforeTerminate would.
//   - GET /v1/sandboxes lists the live sandboxes; GET /healthz needs no
//     token.
//
// The server is usable in-process:
//
//	srv, err := local.New(local.Config{Token: token})
//	...
//	httpSrv := &http.Server{Handler: srv.Handler()}
//	...
//	defer srv.Close(ctx)
package local

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/limits"
)

// Server serves the gateway API. Create it with New; end it with Close.
type Server struct {
	cfg          Config
	log          *slog.Logger
	launcher     launcher
	stateDir     string
	ownsStateDir bool // made by New: Close removes it
	runDir       string
	trashDir     string
	lockFile     *os.File
	handler      http.Handler
	snapLocks    keyedMutex
	res          *resources

	running atomic.Int64 // execs running over all sandboxes

	closing     chan struct{} // closed when Close begins
	closeOnce   sync.Once
	closeErr    error
	stopJanitor context.CancelFunc
	janitorDone chan struct{}

	mu        sync.Mutex
	closed    bool
	sandboxes map[string]*sandbox
	creating  int                   // creates under way, counted against MaxSandboxes
	idem      map[string]*idemEntry // x-idempotency-key → its create
	idemFIFO  []expiring            // keys of ended sandboxes, the oldest first
	execFIFO  []expiring            // finished execs, the oldest first
}

// idemEntry is the create of one idempotency key: concurrent creates with
// the key wait on done and get the same answer.
type idemEntry struct {
	done chan struct{} // closed when id or err is set
	id   string
	err  error
}

// expiring is a finished thing to forget at until. Retention is the same
// for all, so the order of ending is the order of expiry: a queue suffices
// and each sweep costs what expires, not what is kept.
type expiring struct {
	until time.Time
	sb    *sandbox // for an exec
	key   string   // the exec id, or the idempotency key
}

// New checks cfg, prepares the state dir, picks the isolation and starts
// the janitor. The caller must Close the server.
func New(cfg Config) (*Server, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		closing:   make(chan struct{}),
		sandboxes: make(map[string]*sandbox),
		idem:      make(map[string]*idemEntry),
	}
	if err := s.openStateDir(); err != nil {
		s.releaseStateDir()
		return nil, err
	}
	mode, err := s.chooseIsolation()
	if err != nil {
		s.releaseStateDir()
		return nil, err
	}
	s.launcher = launcher{mode: mode, bwrap: cfg.BwrapPath, stateDir: s.stateDir}
	if err := s.setupResources(); err != nil {
		s.closeResources()
		s.releaseStateDir()
		return nil, err
	}
	s.handler = s.routes()

	ctx, cancel := context.WithCancel(context.Background())
	s.stopJanitor = cancel
	s.janitorDone = make(chan struct{})
	go s.janitor(ctx)
	return s, nil
}

// Handler returns the HTTP handler of the API.
func (s *Server) Handler() http.Handler { return s.handler }

// Isolation returns the isolation the server chose: IsolationBwrap or
// IsolationNone.
func (s *Server) Isolation() Isolation { return s.launcher.mode }

// StateDir returns the state directory in use.
func (s *Server) StateDir() string { return s.stateDir }

// Close ends the server: later API calls get 503, long polls return,
// running execs are killed, the janitor stops, and every sandbox ends as
// if its idle timeout had come: a persistent one with a logical key keeps
// its files as a snapshot, the others' files are removed. Close waits for
// all that until ctx is done. Calling it again returns the first result.
func (s *Server) Close(ctx context.Context) error {
	s.closeOnce.Do(func() { s.closeErr = s.close(ctx) })
	return s.closeErr
}

func (s *Server) close(ctx context.Context) error {
	close(s.closing)
	s.stopJanitor()
	<-s.janitorDone

	s.mu.Lock()
	s.closed = true
	sandboxes := make([]*sandbox, 0, len(s.sandboxes))
	for _, sb := range s.sandboxes {
		sandboxes = append(sandboxes, sb)
	}
	clear(s.sandboxes)
	s.mu.Unlock()

	// Kill every exec first, so that all of them die at once.
	for _, sb := range sandboxes {
		sb.beginEnd()
	}
	var errs []error
	for _, sb := range sandboxes {
		if err := s.finishEnd(ctx, sb, sb.persistent, "shutdown"); err != nil {
			errs = append(errs, err)
		}
	}
	s.closeResources()
	s.releaseStateDir()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("local: close: %w", err)
	}
	s.log.Info("gateway closed", "sandboxes_ended", len(sandboxes))
	return nil
}

// openStateDir creates and locks the state dir and clears what a previous
// run left of its sandboxes.
func (s *Server) openStateDir() error {
	dir := s.cfg.StateDir
	if dir == "" {
		d, err := os.MkdirTemp("", "boxq-gateway-")
		if err != nil {
			return fmt.Errorf("local: state dir: %w", err)
		}
		dir, s.ownsStateDir = d, true
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("local: state dir: %w", err)
	}
	// bubblewrap hides the state dir by its path: it must be the real one.
	dir, err := filepath.Abs(dir)
	if err == nil {
		dir, err = filepath.EvalSymlinks(dir)
	}
	if err != nil {
		return fmt.Errorf("local: state dir: %w", err)
	}
	s.stateDir = dir

	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("local: state dir: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return fmt.Errorf("local: state dir %s is in use by another gateway: %w", dir, err)
	}
	s.lockFile = lock

	// Sandboxes live in memory: those of an earlier run are gone, and so
	// are their files. Snapshots stay.
	s.runDir = filepath.Join(dir, "run")
	s.trashDir = filepath.Join(dir, "trash")
	// A crashed run may have left its sandboxes' disks and overlays mounted.
	if err := limits.UnmountUnder(filepath.Join(dir, "sandboxes")); err != nil {
		return fmt.Errorf("local: state dir: %w", err)
	}
	for _, d := range []string{"sandboxes", "run", "trash"} {
		if err := os.RemoveAll(filepath.Join(dir, d)); err != nil {
			return fmt.Errorf("local: state dir: %w", err)
		}
	}
	for _, d := range []string{"sandboxes", "snapshots", "run", "trash"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return fmt.Errorf("local: state dir: %w", err)
		}
	}
	return nil
}

// releaseStateDir unlocks the state dir, and removes it if New made it.
func (s *Server) releaseStateDir() {
	if s.lockFile != nil {
		s.lockFile.Close()
		s.lockFile = nil
	}
	if s.ownsStateDir && s.stateDir != "" {
		if err := os.RemoveAll(s.stateDir); err != nil {
			s.log.Warn("cannot remove state dir", "state_dir", s.stateDir, "error", err)
		}
	}
}

// chooseIsolation resolves IsolationAuto with a probe run of bubblewrap.
func (s *Server) chooseIsolation() (Isolation, error) {
	switch s.cfg.Isolation {
	case IsolationNone:
		s.log.Warn("isolation: none: commands run as plain processes with the gateway's rights")
		return IsolationNone, nil
	case IsolationBwrap:
		if err := probeBwrap(context.Background(), s.cfg.BwrapPath, s.stateDir); err != nil {
			return "", fmt.Errorf("local: isolation bwrap: %w", err)
		}
		s.log.Info("isolation: bwrap")
		return IsolationBwrap, nil
	}
	if err := probeBwrap(context.Background(), s.cfg.BwrapPath, s.stateDir); err != nil {
		s.log.Warn("isolation: none, because bubblewrap does not work here: commands run as plain processes with the gateway's rights", "error", err)
		return IsolationNone, nil
	}
	s.log.Info("isolation: bwrap (probe worked)")
	return IsolationBwrap, nil
}

// janitor ends expired sandboxes and forgets old execs, every tick.
func (s *Server) janitor(ctx context.Context) {
	defer close(s.janitorDone)
	t := time.NewTicker(s.cfg.JanitorInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.sweep(ctx)
		}
	}
}

// sweep does one janitor round.
func (s *Server) sweep(ctx context.Context) {
	now := s.cfg.Now()
	type ending struct {
		sb  *sandbox
		why string
	}
	var expired []ending
	s.mu.Lock()
	// At most MaxSandboxes: cheap to look at all.
	for id, sb := range s.sandboxes {
		if why := sb.expiry(now); why != "" {
			delete(s.sandboxes, id)
			s.retainIdemLocked(sb, now)
			expired = append(expired, ending{sb, why})
		}
	}
	n := 0
	for n < len(s.idemFIFO) && !s.idemFIFO[n].until.After(now) {
		delete(s.idem, s.idemFIFO[n].key)
		n++
	}
	s.idemFIFO = s.idemFIFO[n:]
	n = 0
	for n < len(s.execFIFO) && !s.execFIFO[n].until.After(now) {
		n++
	}
	forget := s.execFIFO[:n]
	s.execFIFO = s.execFIFO[n:]
	s.mu.Unlock()

	for _, x := range forget {
		x.sb.mu.Lock()
		delete(x.sb.execs, x.key)
		x.sb.mu.Unlock()
	}
	for _, x := range expired {
		x.sb.beginEnd()
		// The gateway, not the client, ends it: keep what a persistent
		// sandbox wrote, as a terminate with a snapshot would.
		if err := s.finishEnd(ctx, x.sb, x.sb.persistent, x.why); err != nil {
			x.sb.log.Error("ending expired sandbox", "reason", x.why, "error", err)
		}
	}
}

// retainIdemLocked starts the retention of the idempotency key of sb, which
// has just left s.sandboxes: a create with it still gets sb's id (and then
// 404s) until it expires. s.mu must be held.
func (s *Server) retainIdemLocked(sb *sandbox, now time.Time) {
	if sb.idemKey == "" {
		return
	}
	if e := s.idem[sb.idemKey]; e != nil && e.id == sb.id {
		s.idemFIFO = append(s.idemFIFO, expiring{until: now.Add(s.cfg.ExecRetention), key: sb.idemKey})
	}
}

// beginEnd stops new execs in sb and kills its running ones.
func (sb *sandbox) beginEnd() {
	sb.mu.Lock()
	sb.ending = true
	running := make([]*execution, 0, sb.running)
	for _, e := range sb.execs {
		if !e.ended() {
			running = append(running, e)
		}
	}
	sb.mu.Unlock()
	for _, e := range running {
		e.kill(gateway.StatusCancelled)
	}
}

// finishEnd waits for sb's execs to end (until ctx is done), then keeps its
// files as the snapshot of its logical key when snapshot is true and it is
// persistent with a key, and removes the rest. beginEnd must have run.
func (s *Server) finishEnd(ctx context.Context, sb *sandbox, snapshot bool, reason string) error {
	sb.mu.Lock()
	execs := make([]*execution, 0, len(sb.execs))
	for _, e := range sb.execs {
		execs = append(execs, e)
	}
	sb.mu.Unlock()
	for _, e := range execs {
		select {
		case <-e.done:
		case <-ctx.Done():
			// Killed with SIGKILL already: only their output is late.
			sb.log.Warn("sandbox ending before its execs did", "error", ctx.Err())
		}
	}
	sb.mu.Lock()
	sb.execs = nil // the outputs of a gone sandbox are unreachable: free them
	sb.mu.Unlock()

	keep := snapshot && sb.persistent && sb.logicalKey != ""
	err := s.releaseRuntime(sb, keep)
	kept := false
	if keep && err == nil {
		if err = s.saveSnapshot(sb); err == nil {
			kept = true
		}
	}
	if rmErr := os.RemoveAll(sb.dir); rmErr != nil {
		err = errors.Join(err, rmErr)
	}
	sb.log.Info("sandbox ended", "reason", reason, "snapshot", kept, "logical_key", sb.logicalKey)
	if err != nil {
		return fmt.Errorf("sandbox %s: %w", sb.id, err)
	}
	return nil
}

// snapshotDir is where the snapshot of a logical key lives.
func (s *Server) snapshotDir(key string) string {
	return filepath.Join(s.stateDir, "snapshots", safeName(key))
}

// saveSnapshot makes sb's files the snapshot of its logical key, replacing
// the earlier one. Renames only: no copy, whatever the size. (Between the
// two renames no snapshot exists; a crash there loses the old one, while
// the new one is left in sb's dir, which the next start removes.)
func (s *Server) saveSnapshot(sb *sandbox) error {
	unlock := s.snapLocks.lock(sb.logicalKey)
	defer unlock()
	dst := s.snapshotDir(sb.logicalKey)
	old := filepath.Join(s.trashDir, "snapshot-"+sb.id)
	if err := os.Rename(dst, old); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("snapshot: %w", err)
	}
	fsDir, _ := fsLayout(sb.dir)
	if err := os.Rename(fsDir, dst); err != nil {
		_ = os.Rename(old, dst) // put the earlier one back
		return fmt.Errorf("snapshot: %w", err)
	}
	if err := os.RemoveAll(old); err != nil {
		sb.log.Warn("cannot remove replaced snapshot", "path", old, "error", err)
	}
	return nil
}
