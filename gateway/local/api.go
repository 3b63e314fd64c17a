package local

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/gateway"
)

// Bounds of the strings a client chooses, so that none of them can make a
// map key or a log line of any size.
const (
	maxKeyLen    = 1024 // x-idempotency-key, logicalKey
	maxExecIDLen = 256
)

// terminateTimeout bounds a terminate's wait for its execs and its files,
// independent of the client, who may hang up meanwhile.
const terminateTimeout = 30 * time.Second

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, gateway.StatusResponse{Status: "ok"})
	})
	v1 := func(pattern string, h http.HandlerFunc) { mux.Handle(pattern, s.authed(h)) }
	v1("POST /v1/sandboxes", s.handleCreate)
	v1("GET /v1/sandboxes", s.handleList)
	v1("POST /v1/sandboxes/{id}/execs", s.handleStart)
	v1("GET /v1/sandboxes/{id}/execs/{execId}", s.handlePoll)
	v1("POST /v1/sandboxes/{id}/execs/{execId}/cancel", s.handleCancel)
	v1("POST /v1/sandboxes/{id}/terminate", s.handleTerminate)
	v1("GET /v1/images", s.handleImages)
	v1("/", func(w http.ResponseWriter, r *http.Request) {
		s.writeError(w, r, &apiError{status: http.StatusNotFound, msg: fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path)})
	})
	return recoverPanics(s.log, logRequests(s.log, mux))
}

// createSpec is a checked create request.
type createSpec struct {
	image      string
	cwd        string
	lifetime   time.Duration
	idle       time.Duration
	persistent bool
	logicalKey string
	cpu        float64
	memoryMiB  int
	diskMiB    int
	cwdGiven   bool // the create named a cwd other than the default
}

// millis checks a duration in milliseconds from a request: not negative,
// at most MaxTimeout; 0 means def.
func millis(name string, ms int64, def time.Duration) (time.Duration, error) {
	switch {
	case ms < 0:
		return 0, badRequest("%s %d is negative", name, ms)
	case ms > MaxTimeout.Milliseconds():
		return 0, badRequest("%s %d is over the maximum of %d (24 h)", name, ms, MaxTimeout.Milliseconds())
	case ms == 0:
		return def, nil
	}
	return time.Duration(ms) * time.Millisecond, nil
}

func checkCwd(cwd string) error {
	if cwd != "" && !path.IsAbs(cwd) {
		return badRequest("cwd %q is not an absolute path", cwd)
	}
	return nil
}

func checkCreate(req gateway.CreateRequest) (createSpec, error) {
	spec := createSpec{image: req.Image, cwd: cmp.Or(req.Cwd, gateway.DefaultCwd), persistent: req.PersistentFilesystem, logicalKey: req.LogicalKey,
		cpu: req.CPU, memoryMiB: req.MemoryMiB, diskMiB: req.DiskMiB, cwdGiven: req.Cwd != "" && req.Cwd != gateway.DefaultCwd}
	// cpu, memoryMiB and diskMiB are enforced where the machine allows it
	// (runtime.go); nonsense is refused everywhere.
	switch {
	case req.CPU < 0:
		return spec, badRequest("cpu %v is negative", req.CPU)
	case req.MemoryMiB < 0:
		return spec, badRequest("memoryMiB %d is negative", req.MemoryMiB)
	case req.DiskMiB < 0:
		return spec, badRequest("diskMiB %d is negative", req.DiskMiB)
	case len(req.LogicalKey) > maxKeyLen:
		return spec, badRequest("logicalKey is %d bytes long, over the maximum of %d", len(req.LogicalKey), maxKeyLen)
	}
	if err := checkCwd(req.Cwd); err != nil {
		return spec, err
	}
	var err error
	if spec.lifetime, err = millis("timeoutMs", req.TimeoutMs, gateway.DefaultTimeoutMs*time.Millisecond); err != nil {
		return spec, err
	}
	if spec.idle, err = millis("idleTimeoutMs", req.IdleTimeoutMs, gateway.DefaultIdleTimeoutMs*time.Millisecond); err != nil {
		return spec, err
	}
	return spec, nil
}

func (s *Server) handleCreate(w http.ResponseWriter, r *http.Request) {
	key := r.Header.Get("X-Idempotency-Key")
	if len(key) > maxKeyLen {
		s.writeError(w, r, badRequest("x-idempotency-key is %d bytes long, over the maximum of %d", len(key), maxKeyLen))
		return
	}
	req, err := readCreate(w, r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	spec, err := checkCreate(req)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	id, err := s.create(r.Context(), key, spec)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, gateway.CreateResponse{ID: id})
}

// create makes a sandbox, or returns the one of key: concurrent creates
// with one key make one sandbox, all of them waiting for it.
func (s *Server) create(ctx context.Context, key string, spec createSpec) (string, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return "", errClosing
	}
	if e := s.idem[key]; key != "" && e != nil {
		s.mu.Unlock()
		select {
		case <-e.done:
			return e.id, e.err
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	if len(s.sandboxes)+s.creating >= s.cfg.MaxSandboxes {
		retry := s.retryAfterLocked()
		s.mu.Unlock()
		return "", &apiError{
			status:     http.StatusTooManyRequests,
			msg:        fmt.Sprintf("too many sandboxes: %d live, the maximum; terminate one or retry later", s.cfg.MaxSandboxes),
			retryAfter: retry,
		}
	}
	s.creating++
	var entry *idemEntry
	if key != "" {
		entry = &idemEntry{done: make(chan struct{})}
		s.idem[key] = entry
	}
	s.mu.Unlock()

	sb, err := s.newSandbox(key, spec)

	s.mu.Lock()
	s.creating--
	orphan := false
	if err == nil && s.closed {
		orphan, err = true, errClosing
	}
	id := ""
	if err == nil {
		id = sb.id
		s.sandboxes[id] = sb
	}
	if entry != nil {
		entry.id, entry.err = id, err
		if err != nil {
			delete(s.idem, key) // a failed create is not remembered: the next one tries anew
		}
		close(entry.done)
	}
	s.mu.Unlock()
	if orphan {
		// Its overlay, disk and cgroup first: removeTree cannot undo them.
		_ = s.releaseRuntime(sb, false)
		_ = removeTree(sb.dir)
	}
	return id, err
}

// retryAfterLocked is how long a create refused for capacity should wait:
// until the first live sandbox may expire, within [1 s, 1 min].
// s.mu must be held.
func (s *Server) retryAfterLocked() time.Duration {
	now := s.cfg.Now()
	wait := time.Minute
	for _, sb := range s.sandboxes {
		wait = min(wait, sb.nextExpiry().Sub(now))
	}
	return max(wait, time.Second)
}

// newSandbox makes the directory tree of a new sandbox, from the snapshot
// of its logical key when it is persistent and one exists.
func (s *Server) newSandbox(idemKey string, spec createSpec) (*sandbox, error) {
	img, imageNote, err := s.resolveImage(spec.image)
	if err != nil {
		return nil, err
	}
	if img != nil && img.WorkingDir != "" && !spec.cwdGiven {
		spec.cwd = img.WorkingDir // the image's, unless the create chose one
	}
	id := newID()
	dir := filepath.Join(s.sandboxesDir, id)
	snapshot := ""
	if spec.persistent && spec.logicalKey != "" {
		unlock := s.snapLocks.lock(spec.logicalKey)
		defer unlock()
		snapshot = s.snapshotDir(spec.logicalKey)
	}
	log := s.log.With("sandbox_id", id)
	dirs, restored, err := s.makeSandboxDir(dir, snapshot, log)
	if err != nil {
		if rmErr := removeTree(dir); rmErr != nil {
			log.Warn("cannot remove the files of a failed create", "error", rmErr)
		}
		return nil, fmt.Errorf("create sandbox: %w", err)
	}
	rt, dirs, err := s.prepareRuntime(id, dir, spec, img, imageNote, dirs)
	if err != nil {
		_ = s.releaseRuntime(&sandbox{dir: dir, rt: rt}, false)
		_ = removeTree(dir)
		var ae *apiError
		if errors.As(err, &ae) {
			return nil, err
		}
		return nil, fmt.Errorf("create sandbox: %w", err)
	}
	now := s.cfg.Now()
	sb := &sandbox{
		id:         id,
		idemKey:    idemKey,
		logicalKey: spec.logicalKey,
		persistent: spec.persistent,
		cwd:        spec.cwd,
		dir:        dir,
		dirs:       dirs,
		createdAt:  now,
		lifetime:   spec.lifetime,
		idle:       spec.idle,
		log:        log,
		execs:      make(map[string]*execution),
		lastActive: now,
		rt:         rt,
	}
	sb.log.Info("sandbox created", "logical_key", spec.logicalKey, "persistent", spec.persistent,
		"restored", restored, "image", spec.image, "lifetime", spec.lifetime, "idle_timeout", spec.idle)
	return sb, nil
}

// lookup returns the live sandbox id.
func (s *Server) lookup(id string) (*sandbox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sb := s.sandboxes[id]; sb != nil {
		return sb, nil
	}
	return nil, sandboxNotFound(id)
}

func (s *Server) handleStart(w http.ResponseWriter, r *http.Request) {
	sb, err := s.lookup(r.PathValue("id"))
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	req, err := readStart(w, r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	switch {
	case strings.TrimSpace(req.Command) == "":
		err = badRequest("command is empty")
	case len(req.ExecID) > maxExecIDLen:
		err = badRequest("execId is %d bytes long, over the maximum of %d", len(req.ExecID), maxExecIDLen)
	default:
		err = checkCwd(req.Cwd)
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	timeout, err := millis("timeoutMs", req.TimeoutMs, 0)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	id := req.ExecID
	if id == "" {
		id = uuid.NewString() // the client sent none: the exec cannot be re-attached, but it runs
	}
	spec := execSpec{dirs: sb.dirs, cwd: cmp.Or(req.Cwd, sb.cwd), command: req.Command, stdin: req.StdinData, timeout: timeout, rt: sb.rt}
	e, existed, err := s.startExec(sb, id, spec)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if !existed && s.cfg.StartWait > 0 {
		s.await(r.Context(), e, s.cfg.StartWait)
	}
	e.writeState(w)
}

// startExec starts exec id in sb, or returns the exec that already has
// that id (existed), which never runs twice.
func (s *Server) startExec(sb *sandbox, id string, spec execSpec) (e *execution, existed bool, err error) {
	sb.mu.Lock()
	if sb.ending {
		sb.mu.Unlock()
		return nil, false, sandboxNotFound(sb.id)
	}
	if e := sb.execs[id]; e != nil {
		sb.mu.Unlock()
		return e, true, nil
	}
	if _, gone := sb.tombs[tombKeyOf(id)]; gone {
		sb.mu.Unlock()
		return nil, false, &apiError{status: http.StatusConflict, msg: fmt.Sprintf("exec %s already ran and its result has expired: an execId never runs twice", id)}
	}
	if sb.running >= s.cfg.MaxSandboxRunningExecs {
		sb.mu.Unlock()
		return nil, false, &apiError{
			status:     http.StatusTooManyRequests,
			msg:        fmt.Sprintf("too many running execs in sandbox %s: %d, the maximum per sandbox; retry later", sb.id, s.cfg.MaxSandboxRunningExecs),
			retryAfter: time.Second,
		}
	}
	if s.running.Add(1) > int64(s.cfg.MaxRunningExecs) {
		s.running.Add(-1)
		sb.mu.Unlock()
		return nil, false, &apiError{
			status:     http.StatusTooManyRequests,
			msg:        fmt.Sprintf("too many running execs: %d, the maximum; retry later", s.cfg.MaxRunningExecs),
			retryAfter: time.Second,
		}
	}
	e = newExecution(id, sb.log.With("exec_id", id))
	sb.execs[id] = e
	sb.running++
	sb.lastActive = s.cfg.Now()
	sb.mu.Unlock()

	e.log.Debug("exec starting", "cwd", spec.cwd, "timeout", spec.timeout, "stdin_bytes", len(spec.stdin))
	s.launch(e, spec, func(at time.Time) { s.execEnded(sb, e, at) })
	return e, false, nil
}

// execEnded books the end, at at, of e in sb and keeps it for polls
// within the retention caps.
func (s *Server) execEnded(sb *sandbox, e *execution, at time.Time) {
	s.running.Add(-1)
	sb.mu.Lock()
	sb.running--
	sb.lastActive = at
	sb.mu.Unlock()
	s.mu.Lock()
	s.retainLocked(sb, e, at)
	s.mu.Unlock()
}

// await waits up to d for e to end, or until the request is gone or the
// server closes.
func (s *Server) await(ctx context.Context, e *execution, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-e.done:
	case <-t.C:
	case <-ctx.Done():
	case <-s.closing:
	}
}

// execOf returns exec id of sandbox sbID.
func (s *Server) execOf(sbID, id string) (*execution, error) {
	sb, err := s.lookup(sbID)
	if err != nil {
		return nil, err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if e := sb.execs[id]; e != nil {
		return e, nil
	}
	if _, gone := sb.tombs[tombKeyOf(id)]; gone {
		return nil, &apiError{status: http.StatusNotFound, msg: fmt.Sprintf("exec %s expired: the gateway no longer keeps its result (see -exec-retention, -max-retained-execs, -max-retained-bytes)", id)}
	}
	return nil, execNotFound(id)
}

func (s *Server) handlePoll(w http.ResponseWriter, r *http.Request) {
	e, err := s.execOf(r.PathValue("id"), r.PathValue("execId"))
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	ms, err := waitParam(r.URL.Query().Get(gateway.WaitParam))
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	wait := time.Duration(ms) * time.Millisecond
	if wait > 0 && !e.ended() {
		s.await(r.Context(), e, wait)
	}
	e.writeState(w)
}

func (s *Server) handleCancel(w http.ResponseWriter, r *http.Request) {
	e, err := s.execOf(r.PathValue("id"), r.PathValue("execId"))
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if !e.ended() {
		e.log.Info("exec cancelled")
	}
	e.kill(gateway.StatusCancelled)
	writeJSON(w, http.StatusOK, gateway.StatusResponse{Status: "cancelling"})
}

func (s *Server) handleTerminate(w http.ResponseWriter, r *http.Request) {
	req, err := readTerminate(w, r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	id := r.PathValue("id")
	s.mu.Lock()
	sb := s.sandboxes[id]
	if sb != nil {
		delete(s.sandboxes, id)
		s.retainIdemLocked(sb, s.cfg.Now())
	}
	s.mu.Unlock()
	if sb == nil {
		s.writeError(w, r, sandboxNotFound(id))
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), terminateTimeout)
	defer cancel()
	sb.beginEnd()
	if err := s.finishEnd(ctx, sb, req.SnapshotBeforeTerminate, "terminate"); err != nil {
		s.writeError(w, r, fmt.Errorf("terminate: %w", err))
		return
	}
	writeJSON(w, http.StatusOK, gateway.StatusResponse{Status: "terminated"})
}

func (s *Server) handleList(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	sandboxes := make([]*sandbox, 0, len(s.sandboxes))
	for _, sb := range s.sandboxes {
		sandboxes = append(sandboxes, sb)
	}
	s.mu.Unlock()
	slices.SortFunc(sandboxes, func(a, b *sandbox) int {
		return cmp.Or(a.createdAt.Compare(b.createdAt), strings.Compare(a.id, b.id))
	})
	resp := gateway.ListResponse{Sandboxes: make([]gateway.SandboxInfo, 0, len(sandboxes))}
	for _, sb := range sandboxes {
		sb.mu.Lock()
		info := gateway.SandboxInfo{
			ID:           sb.id,
			LogicalKey:   sb.logicalKey,
			Status:       "running",
			CreatedAt:    sb.createdAt.UTC().Format(time.RFC3339Nano),
			LastActiveAt: sb.lastActive.UTC().Format(time.RFC3339Nano),
			RunningExecs: sb.running,
		}
		sb.rt.describe(&info)
		sb.mu.Unlock()
		resp.Sandboxes = append(resp.Sandboxes, info)
	}
	writeJSON(w, http.StatusOK, resp)
}
