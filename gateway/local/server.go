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
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
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
	// sandboxesDir is outside the state dir, made by New: Close removes it.
	ownsSandboxesDir bool
	runDir           string
	sandboxesDir     string // StateDir/sandboxes, or a dir of its own (see openSandboxesDir)
	trashDir         string
	lockFile         *os.File
	handler          http.Handler
	snapLocks        keyedMutex
	res              *resources

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

	// Finished execs, kept for polls: the oldest first, bounded by
	// ExecRetention, MaxRetainedExecs and MaxRetainedBytes together.
	execFIFO      []*retainedExec
	retainedCount int
	retainedBytes int64
	// The ids of execs no longer kept, so that none runs again: the
	// oldest first, bounded by MaxTombstones. The ids themselves are in
	// their sandbox's tombs.
	tombFIFO []tombRef
}

// retainedExec is a finished exec kept for polls.
type retainedExec struct {
	until   time.Time
	sb      *sandbox
	e       *execution
	size    int64
	dropped bool // evicted, or gone with its sandbox: no longer counted
}

// tombRef is a tombstone in the FIFO: the sandbox whose tombs hold it.
type tombRef struct {
	sb  *sandbox
	key tombKey
}

// idemEntry is the create of one idempotency key: concurrent creates with
// the key wait on done and get the same answer.
type idemEntry struct {
	done chan struct{} // closed when id or err is set
	id   string
	err  error
}

// expiring is an idempotency key to forget at until. Retention is the
// same for all, so the order of ending is the order of expiry: a queue
// suffices and each sweep costs what expires, not what is kept. The same
// holds for retainedExec.
type expiring struct {
	until time.Time
	key   string
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
	// As root, bubblewrap runs as the sandbox user, who must reach the
	// sandboxes' own dirs.
	s.sandboxesDir = filepath.Join(s.stateDir, "sandboxes")
	var user *owner
	if os.Geteuid() == 0 && cfg.Isolation != IsolationNone {
		user = &owner{uid: cfg.SandboxUID, gid: cfg.SandboxGID}
		if err := s.openSandboxesDir(user); err != nil {
			s.releaseStateDir()
			return nil, fmt.Errorf("local: state dir: %w", err)
		}
	}
	mode, view, err := s.chooseIsolation(user)
	if err != nil {
		s.releaseStateDir()
		return nil, err
	}
	if mode == IsolationNone {
		user = nil
	}
	s.launcher = launcher{mode: mode, bwrap: cfg.BwrapPath, user: user, view: view}
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
		// What cannot go does not stop the gateway: the new sandboxes'
		// ids are new, and the next start tries again.
		if err := removeTree(filepath.Join(dir, d)); err != nil {
			s.log.Error("state dir: cannot remove what an earlier run left; starting anyway", "path", filepath.Join(dir, d), "error", err)
		}
	}
	for _, d := range []string{"sandboxes", "snapshots", "run", "trash"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return fmt.Errorf("local: state dir: %w", err)
		}
	}
	return nil
}

// openSandboxesDir makes the sandboxes' dir reachable by user, who runs
// bubblewrap: search permission (0710, user's group) on the state dir and
// on the sandboxes' dir, whose listings stay private. When a directory
// above the state dir does not let user search (a state dir under /root,
// or under a test's private temporary dir), the sandboxes' working files
// go to a directory of their own in os.TempDir() instead, named after the
// state dir, emptied at start and removed by Close; snapshots stay in the
// state dir.
func (s *Server) openSandboxesDir(user *owner) error {
	if user.canSearchAbove(s.stateDir) {
		for _, d := range []string{s.stateDir, s.sandboxesDir} {
			if err := user.traversable(d); err != nil {
				return err
			}
		}
		return nil
	}
	sum := sha256.Sum256([]byte(s.stateDir))
	dir := filepath.Join(os.TempDir(), "boxq-sandboxes-"+hex.EncodeToString(sum[:8]))
	if !user.canSearchAbove(dir) {
		return fmt.Errorf("uid %d cannot reach %s nor %s: bubblewrap, run as that user, could not reach the sandboxes", user.uid, s.stateDir, dir)
	}
	// What is there is an earlier run's, or someone else's: it goes (a
	// symlink is removed, not followed), and Mkdir makes a new one or fails.
	// Its sandboxes' disks and overlays may still be mounted.
	if err := limits.UnmountUnder(dir); err != nil {
		return err
	}
	if err := removeTree(dir); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	s.sandboxesDir, s.ownsSandboxesDir = dir, true
	s.log.Info("the sandbox user cannot reach the state dir: sandboxes' working files go elsewhere", "state_dir", s.stateDir, "sandboxes_dir", dir, "sandbox_uid", user.uid)
	if err := os.WriteFile(filepath.Join(dir, stateDirRecord), []byte(s.stateDir), 0o600); err != nil {
		return err
	}
	s.removeOrphanSandboxesDirs(dir)
	return user.traversable(dir)
}

// stateDirRecord names, in a sandboxes' dir of its own, the file that
// holds the path of its state dir.
const stateDirRecord = "state-dir"

// removeOrphanSandboxesDirs removes the sandboxes' dirs of their own (but
// mine) that a gateway killed before its Close left in os.TempDir() for a
// state dir that is gone since (a test's temporary one, typically): no
// start will ever empty them.
func (s *Server) removeOrphanSandboxesDirs(mine string) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "boxq-sandboxes-*"))
	for _, d := range dirs {
		fi, err := os.Lstat(d)
		if d == mine || err != nil || !fi.IsDir() {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != os.Geteuid() {
			continue // not a gateway's of this user
		}
		state, err := os.ReadFile(filepath.Join(d, stateDirRecord))
		if err != nil || !filepath.IsAbs(string(state)) {
			continue
		}
		if _, err := os.Lstat(string(state)); !errors.Is(err, os.ErrNotExist) {
			continue // its gateway, or the next one, will see to it
		}
		_ = limits.UnmountUnder(d) // a killed gateway's disks and overlays
		if err := removeTree(d); err != nil {
			s.log.Warn("cannot remove an orphan sandboxes dir", "path", d, "error", err)
		} else {
			s.log.Info("removed an orphan sandboxes dir", "path", d, "state_dir", string(state))
		}
	}
}

// releaseStateDir unlocks the state dir, and removes it if New made it.
func (s *Server) releaseStateDir() {
	if s.ownsSandboxesDir {
		if err := removeTree(s.sandboxesDir); err != nil {
			s.log.Warn("cannot remove sandboxes dir", "sandboxes_dir", s.sandboxesDir, "error", err)
		}
		s.ownsSandboxesDir = false
	}
	if s.lockFile != nil {
		s.lockFile.Close()
		s.lockFile = nil
	}
	if s.ownsStateDir && s.stateDir != "" {
		if err := removeTree(s.stateDir); err != nil {
			s.log.Warn("cannot remove state dir", "state_dir", s.stateDir, "error", err)
		}
	}
}

// chooseIsolation resolves IsolationAuto with a probe run of bubblewrap,
// and works out the host's view that bubblewrap gives commands.
func (s *Server) chooseIsolation(user *owner) (Isolation, hostView, error) {
	if s.cfg.Isolation == IsolationNone {
		s.log.Warn("isolation: none: commands run as plain processes with the gateway's rights")
		return IsolationNone, hostView{}, nil
	}
	autoNone := func(err error) (Isolation, hostView, error) {
		s.log.Warn("isolation: none, because bubblewrap cannot be used here: commands run as plain processes with the gateway's rights", "error", err)
		return IsolationNone, hostView{}, nil
	}
	if _, err := exec.LookPath(s.cfg.BwrapPath); err != nil && s.cfg.Isolation == IsolationAuto {
		// No bubblewrap to use: no view to work out (its walk of the
		// host's trees is the slow part of a start).
		return autoNone(fmt.Errorf("bubblewrap not found: %w", err))
	}
	view, viewErr := newHostView(s.log, s.stateDir, s.sandboxesDir)
	if viewErr != nil && s.cfg.Isolation == IsolationBwrap {
		return "", hostView{}, fmt.Errorf("local: isolation bwrap: %w", viewErr)
	}
	// Past the view's bounds, the probe runs over the view without its
	// masks: it tells whether bubblewrap works here at all.
	err := probeBwrap(context.Background(), s.cfg.BwrapPath, s.sandboxesDir, user, view)
	if s.cfg.Isolation == IsolationBwrap {
		if err != nil {
			return "", hostView{}, fmt.Errorf("local: isolation bwrap: %w", err)
		}
		s.log.Info("isolation: bwrap", "sandbox_uid", user.uidOr(os.Getuid()))
		return IsolationBwrap, view, nil
	}
	if err != nil {
		return autoNone(err)
	}
	if viewErr != nil {
		// bubblewrap works, but over a view that cannot be made safe:
		// auto does not fall back to none, which would expose the host
		// the operator has bubblewrap to hide. Without bubblewrap there
		// was nothing to fall back from.
		return "", hostView{}, fmt.Errorf("local: isolation auto: bubblewrap works here, but %w", viewErr)
	}
	s.log.Info("isolation: bwrap (probe worked)", "sandbox_uid", user.uidOr(os.Getuid()))
	return IsolationBwrap, view, nil
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
	for len(s.execFIFO) > 0 && !s.execFIFO[0].until.After(now) {
		s.evictOldestLocked()
	}
	s.mu.Unlock()

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
	// Bounded in number too, the oldest forgotten first: a loop of create
	// and terminate with a new key each would otherwise grow the memory
	// without limit (up to 1 KiB a key) until the first ones expire.
	for len(s.idemFIFO) > maxEndedIdemKeys {
		delete(s.idem, s.idemFIFO[0].key)
		s.idemFIFO[0] = expiring{}
		s.idemFIFO = s.idemFIFO[1:]
	}
}

// maxEndedIdemKeys bounds the idempotency keys of ended sandboxes kept:
// some 20 MiB at most with keys of the largest size, and ended sandboxes
// at 27 a second for the whole ExecRetention before a key goes early.
const maxEndedIdemKeys = 16 << 10

// retainLocked keeps e, which has just finished in sb, for polls, and
// evicts the oldest finished execs while the caps are exceeded. s.mu must
// be held.
func (s *Server) retainLocked(sb *sandbox, e *execution, at time.Time) {
	x := &retainedExec{until: at.Add(s.cfg.ExecRetention), sb: sb, e: e, size: e.retainedSize()}
	e.retained = x
	s.execFIFO = append(s.execFIFO, x)
	s.retainedCount++
	s.retainedBytes += x.size
	for s.retainedCount > s.cfg.MaxRetainedExecs || s.retainedBytes > s.cfg.MaxRetainedBytes {
		s.evictOldestLocked()
	}
}

// evictOldestLocked forgets the oldest retained exec and leaves its
// tombstone. s.mu must be held.
func (s *Server) evictOldestLocked() {
	x := s.execFIFO[0]
	s.execFIFO[0] = nil
	s.execFIFO = s.execFIFO[1:]
	if x.dropped {
		return
	}
	x.dropped = true
	s.retainedCount--
	s.retainedBytes -= x.size
	key := tombKeyOf(x.e.id)
	x.sb.mu.Lock()
	live := x.sb.execs != nil
	if live {
		delete(x.sb.execs, x.e.id)
		if x.sb.tombs == nil {
			x.sb.tombs = make(map[tombKey]struct{})
		}
		x.sb.tombs[key] = struct{}{}
	}
	x.sb.mu.Unlock()
	if !live {
		return
	}
	s.tombFIFO = append(s.tombFIFO, tombRef{sb: x.sb, key: key})
	for len(s.tombFIFO) > s.cfg.MaxTombstones {
		old := s.tombFIFO[0]
		s.tombFIFO[0] = tombRef{}
		s.tombFIFO = s.tombFIFO[1:]
		old.sb.mu.Lock()
		delete(old.sb.tombs, old.key)
		old.sb.mu.Unlock()
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
	sb.tombs = nil
	sb.mu.Unlock()
	s.mu.Lock()
	for _, e := range execs {
		if x := e.retained; x != nil && !x.dropped {
			x.dropped = true
			s.retainedCount--
			s.retainedBytes -= x.size
			// Its entry stays in the queue until its time is up, no
			// longer counted: it must not keep the output alive.
			x.e, x.sb = nil, nil
		}
	}
	s.mu.Unlock()

	keep := snapshot && sb.persistent && sb.logicalKey != ""
	err := s.releaseRuntime(sb, keep)
	kept := false
	if keep && err == nil {
		if err = s.saveSnapshot(sb); err == nil {
			kept = true
		}
	}
	if rmErr := removeTree(sb.dir); rmErr != nil {
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
	fsDir, _ := fsLayout(sb.dir)
	old := filepath.Join(s.trashDir, "snapshot-"+sb.id)
	if err := os.Rename(dst, old); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("snapshot: %w", err)
	}
	err := os.Rename(fsDir, dst)
	if errors.Is(err, syscall.EXDEV) {
		// The sandboxes' dir is on another file system than the state
		// dir (see openSandboxesDir): copy, then rename within it.
		tmp := filepath.Join(s.trashDir, "new-"+sb.id)
		if err = copyTree(fsDir, tmp, s.launcher.user); err == nil {
			err = os.Rename(tmp, dst)
		}
		if err != nil {
			_ = removeTree(tmp)
		}
	}
	if err != nil {
		_ = os.Rename(old, dst) // put the earlier one back
		return fmt.Errorf("snapshot: %w", err)
	}
	if err := removeTree(old); err != nil {
		sb.log.Warn("cannot remove replaced snapshot", "path", old, "error", err)
	}
	return nil
}
