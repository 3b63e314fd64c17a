package sandboxpool

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/boxq/boxq/gateway"
	"github.com/redis/go-redis/v9"
)

// Lease is the exclusive right to use a task's sandbox. Its holder renews
// it in the background until Pool.Release (or the lease is found lost).
//
// The accessors are read-only views; Pool.Recreate changes what they
// return. A Lease is used by one goroutine at a time, except Lost, which
// may be watched from anywhere.
type Lease struct {
	pool      *Pool
	taskID    string
	token     int64
	tokenArg  string
	leaseKey  string
	recordKey string

	sandboxID  string
	cwd        string
	gen        int64
	spec       Spec
	key        string // idempotency key of the current sandbox's create
	createdAt  time.Time
	created    bool
	recreated  bool
	prevExec   string
	otherExecs []string // execs marked in flight besides prevExec and execID
	execID     string   // the exec this holder runs, named at Acquire
	stamp      string   // the stamp's previous boxq_start (Intent.Stamp)
	stampKey   string   // Intent.Stamp

	released atomic.Bool
	stop     func() // stops the renewal and waits for it; idempotent
	lost     chan struct{}
}

// TaskID returns the task whose sandbox this is.
func (l *Lease) TaskID() string { return l.taskID }

// SandboxID returns the gateway's id of the sandbox.
func (l *Lease) SandboxID() string { return l.sandboxID }

// Cwd returns the tracked working directory, "" when none was stored yet
// (the sandbox's default, Spec().Cwd, applies).
func (l *Lease) Cwd() string { return l.cwd }

// Generation returns 1 for the task's first sandbox, +1 per Recreate.
func (l *Lease) Generation() int64 { return l.gen }

// Token returns the lease's fencing token: tokens only grow, so a larger
// token is a later lease.
func (l *Lease) Token() int64 { return l.token }

// CreatedAt returns when the current sandbox's record was made: the start
// of its lifetime (Spec().TimeoutMs), give or take the create call.
func (l *Lease) CreatedAt() time.Time { return l.createdAt }

// Spec returns the spec the sandbox was created with.
func (l *Lease) Spec() Spec { return l.spec }

// Created reports whether the Acquire that returned l created the sandbox.
func (l *Lease) Created() bool { return l.created }

// PrevExecID returns the exec a previous holder of the task's sandbox left
// running without releasing its lease (it crashed, or stopped waiting with
// Abandon), "" when there is none. A holder must let that exec end before
// it starts a command of its own, so that a task's commands never overlap;
// when it is the holder's own exec id, it is a re-delivery that can simply
// re-attach.
func (l *Lease) PrevExecID() string { return l.prevExec }

// PrevExecIDs returns every exec that earlier holders started in the task's
// sandbox and whose jobs have not collected it yet, PrevExecID first, the
// holder's own exec left out: any of them may still run, so a holder must
// let them all end before it starts a command of its own. PrevExecID alone
// is not enough: a holder that crashed while it waited for it replaced it
// with its own exec id, which never started.
func (l *Lease) PrevExecIDs() []string {
	var ids []string
	if l.prevExec != "" && l.prevExec != l.execID {
		ids = append(ids, l.prevExec)
	}
	return append(ids, l.otherExecs...)
}

// SandboxKey returns the idempotency key of the current sandbox's create:
// it names one sandbox generation of the task, even before the gateway
// has answered with an id, and changes with every new sandbox (Recreate,
// or a new record after a terminate or a reap).
func (l *Lease) SandboxKey() string { return l.key }

// StartedIn returns what the take found in the caller's stamp hash
// (Intent.Stamp): the SandboxKey of the sandbox an earlier holder took the
// same stamp for, "" when none did. A job uses it to tell a first delivery
// from one that may have started its command before, and in which sandbox.
func (l *Lease) StartedIn() string { return l.stamp }

// Arm says the holder is about to start the exec named at the take, after
// work that came first (a create, a wait for an earlier exec): from now on a
// rescuer that finds the holder dead collects the exec rather than leave
// the job to asynq's re-delivery. A take arms at once a holder that has
// nothing to do first. One round trip; fenced by the lease's token.
func (p *Pool) Arm(ctx context.Context, l *Lease) error {
	if l.execID == "" {
		return nil
	}
	if err := armScript.Run(ctx, p.rdb, []string{l.recordKey}, l.tokenArg, l.execID).Err(); err != nil {
		return fmt.Errorf("sandboxpool: arm exec of task %q: %w", l.taskID, err)
	}
	return nil
}

// Recreated reports whether the lease's sandbox is not the task's first: it
// replaced one that is gone (Recreate, after the gateway lost it; or a new
// record after a terminate or a reap, whose tombstone it found).
func (l *Lease) Recreated() bool { return l.recreated }

// Lost is closed when a renewal finds that the lease expired (the holder
// stalled longer than the TTL, or Redis lost it): the task may now be in
// other hands, and writes through the lease will be refused.
func (l *Lease) Lost() <-chan struct{} { return l.lost }

// Waits for a busy lease or a free slot start at minPoll and double up to
// maxPoll, with jitter so that waiters do not poll in step.
const (
	minPoll = time.Millisecond
	maxPoll = 25 * time.Millisecond
)

// Acquire returns an exclusive lease on the sandbox of taskID, creating the
// sandbox with spec (defaults applied) when the task has none, or finishing
// a create that an earlier holder started (same idempotency key, so the same
// sandbox). When the lease is held elsewhere, or a new sandbox would exceed
// MaxSandboxes, it waits up to AcquireWait and then returns an error
// wrapping ErrBusy.
//
// The common case, a task with a sandbox and a free lease, is one round
// trip to Redis. The holder must call Release.
//
// execID names the exec the holder is about to run; it is recorded until
// Release, so that if the holder vanishes, the next holder knows which exec
// may still be running (Lease.PrevExecID). "" records none.
func (p *Pool) Acquire(ctx context.Context, taskID string, spec Spec, execID string) (*Lease, error) {
	return p.AcquireFor(ctx, taskID, spec, Intent{ExecID: execID})
}

// Intent says what a holder takes a task's lease for. Everything in it is
// done in the same atomic step as the take.
type Intent struct {
	// ExecID names the exec the holder is about to run ("" none): it is
	// marked in flight until the Release of a holder of that exec.
	ExecID string
	// Note is kept with the in-flight mark: what a rescuer needs to finish
	// the exec's job if the holder dies (ClaimOrphans). Opaque to the pool;
	// "" makes the exec one no rescuer touches.
	Note string
	// Unless are vetoes: the take does nothing, and fails with ErrVetoed,
	// when one holds. They are tested in order.
	Unless []Check
	// noWait fails a take with ErrBusy at once rather than wait.
	noWait bool
	// Stamp names a hash of the caller's (a job's) to stamp with the
	// lease's token (field boxq_owner) and the SandboxKey the exec will
	// start in (boxq_start); the previous boxq_start comes back in
	// Lease.StartedIn. A hash that does not exist is left alone. "" none.
	Stamp string
}

// Check names a mark of the caller's own in Redis that vetoes a take: a
// key that exists (Field ""), a field of a hash that is set, or, with
// Other set, a field set to anything other than Other (a task's sequence
// whose head is another job, say).
type Check struct {
	Key   string
	Field string
	Other string
}

// arg is the check's script argument (checkCaller).
func (c Check) arg() (string, error) {
	if c.Other == "" {
		return c.Field, nil
	}
	if c.Field == "" || strings.ContainsRune(c.Field, '\x02') {
		return "", fmt.Errorf("sandboxpool: check on %q: bad field %q", c.Key, c.Field)
	}
	return "\x02" + c.Field + "\x02" + c.Other, nil
}

// AcquireFor is Acquire with an Intent: the exec and its rescue note, the
// vetoes and the stamp, all in the same atomic step as the take, so that
// on the common path they cost no round trip of their own. When a veto
// holds it takes nothing and returns an error wrapping ErrVetoed and a
// *VetoError naming the check.
func (p *Pool) AcquireFor(ctx context.Context, taskID string, spec Spec, in Intent) (*Lease, error) {
	if taskID == "" {
		return nil, errors.New("sandboxpool: acquire: empty task id")
	}
	spec = spec.WithDefaults()
	if err := spec.validate(); err != nil {
		return nil, err
	}
	l, err := p.take(ctx, taskID, &spec, in)
	if err != nil {
		return nil, err
	}
	if l.sandboxID != "" {
		return l, nil
	}
	if err := p.create(ctx, l); err != nil {
		if gateway.Classify(err) == gateway.Permanent {
			// The gateway answered no (a bad spec, a bad token): it made no
			// sandbox, so the record's key finds none. Drop the record
			// rather than have the reaper spare it for InFlightGrace, with
			// a slot under the cap.
			p.forget(ctx, l)
		} else {
			// The pending record keeps its idempotency key: whoever retries
			// gets the sandbox this create may have made.
			p.Release(ctx, l, "")
		}
		return nil, err
	}
	l.created = true
	// A later generation's pending create (an earlier holder recreated the
	// sandbox, and its create failed): this is a new sandbox too.
	l.recreated = l.recreated || l.gen > 1
	return l, nil
}

// VetoError says which check of an Intent vetoed a take: Index is its
// position in Intent.Unless.
type VetoError struct {
	TaskID string
	Index  int
	Check  Check
}

func (e *VetoError) Error() string {
	return fmt.Sprintf("sandboxpool: task %q: check %d (%s %s) holds", e.TaskID, e.Index, e.Check.Key, e.Check.Field)
}

func (e *VetoError) Unwrap() error { return ErrVetoed }

// forget deletes the record of l's task, whose lease l holds, and frees
// the lease.
func (p *Pool) forget(ctx context.Context, l *Lease) {
	if !l.released.CompareAndSwap(false, true) {
		return
	}
	l.stop()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if err := deleteScript.Run(ctx, p.rdb, []string{p.indexKey, p.tasksKey, l.leaseKey, l.recordKey, p.tombKey(l.taskID)}, p.tombArg, l.tokenArg, l.taskID).Err(); err != nil {
		p.log.Warn("sandboxpool: drop the record of a refused create", "task_id", l.taskID, "err", err)
	}
	// And its note as a pending create (create), which only Created drops
	// otherwise, on a scrape of the metrics.
	_ = p.rdb.SRem(ctx, p.pendingKey, l.taskID).Err()
}

// take takes the lease of taskID, waiting while it is busy, unless one of
// the intent's checks holds. With a spec it reserves a record (and a slot
// under the cap) for a task that has none; without one it returns nil, nil
// for such a task.
func (p *Pool) take(ctx context.Context, taskID string, spec *Spec, in Intent) (*Lease, error) {
	stampKey, stampArg := p.recordKey(taskID), ""
	if in.Stamp != "" {
		stampKey, stampArg = in.Stamp, "1"
	}
	keys := make([]string, takeKeys, takeKeys+len(in.Unless))
	keys[0], keys[1], keys[2], keys[3], keys[4], keys[5], keys[6], keys[7] = p.leaseKey(taskID), p.recordKey(taskID), p.indexKey, p.fenceKey, p.inflightKey, stampKey, p.tombKey(taskID), p.tasksKey
	args := make([]any, takeArgs, takeArgs+len(in.Unless)+10)
	args[0], args[1], args[2], args[3], args[4], args[5] = p.ttlArg, "", taskID, in.ExecID, in.Note, stampArg
	for _, c := range in.Unless {
		arg, err := c.arg()
		if err != nil {
			return nil, err
		}
		keys = append(keys, c.Key)
		args = append(args, arg)
	}
	var (
		start time.Time
		timer *time.Timer
		poll  = minPoll
	)
	for {
		args[1] = p.nowArg()
		reply, err := acquireScript.Run(ctx, p.rdb, keys, args...).Slice()
		if err != nil {
			return nil, fmt.Errorf("sandboxpool: acquire task %q: %w", taskID, err)
		}
		code, n, record, prev, stamp, replaced, err := parseTake(reply)
		if err == nil && code == codeMissing {
			if spec == nil {
				return nil, nil
			}
			rargs := spec.args(append(args[:len(args):len(args)], p.capArg, p.cfg.NewKey()))
			reply, err = reserveScript.Run(ctx, p.rdb, keys, rargs...).Slice()
			if err != nil {
				return nil, fmt.Errorf("sandboxpool: reserve task %q: %w", taskID, err)
			}
			code, n, record, prev, stamp, replaced, err = parseTake(reply)
		}
		if err != nil {
			return nil, fmt.Errorf("sandboxpool: acquire task %q: %w", taskID, err)
		}
		switch code {
		case codeTaken:
			l, err := p.newLease(ctx, taskID, n, record, prev, in.ExecID)
			if l != nil {
				l.stamp, l.stampKey, l.recreated = stamp, in.Stamp, replaced != ""
			}
			return l, err
		case codeVetoed:
			if n < 1 || int(n) > len(in.Unless) {
				return nil, fmt.Errorf("sandboxpool: acquire task %q: vetoed by check %d of %d", taskID, n, len(in.Unless))
			}
			return nil, &VetoError{TaskID: taskID, Index: int(n) - 1, Check: in.Unless[n-1]}
		}

		if start.IsZero() {
			start = time.Now()
		}
		left := p.cfg.AcquireWait - time.Since(start)
		if left <= 0 || in.noWait {
			if code == codeFull {
				return nil, fmt.Errorf("sandboxpool: task %q: the pool holds its maximum of %d sandboxes: %w", taskID, p.cfg.MaxSandboxes, ErrFull)
			}
			return nil, fmt.Errorf("sandboxpool: task %q: lease held elsewhere: %w", taskID, ErrBusy)
		}
		d := poll/2 + rand.N(poll/2+1)
		if code == codeBusy && n > 0 {
			// A crashed holder's lease expires in n ms: be there then.
			d = min(d, time.Duration(n)*time.Millisecond+time.Millisecond)
		}
		d = min(d, left)
		if timer == nil {
			timer = time.NewTimer(d)
			defer timer.Stop()
		} else {
			timer.Reset(d)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("sandboxpool: task %q: waiting for the lease: %w", taskID, ctx.Err())
		case <-timer.C:
		}
		poll = min(2*poll, maxPoll)
	}
}

// parseTake reads a reply of acquireScript or reserveScript: the code, then
// the lease's PTTL (busy) or token (taken), the record's fields, the execs
// earlier holders left in flight (the last one's first, "" if none), the
// stamp's previous value, and the sandbox a new record replaces ("" none).
func parseTake(reply []any) (code, n int64, fields []any, prev []string, stamp, replaced string, err error) {
	if len(reply) == 0 {
		return 0, 0, nil, nil, "", "", errors.New("empty script reply")
	}
	code, ok := reply[0].(int64)
	if !ok {
		return 0, 0, nil, nil, "", "", fmt.Errorf("script reply code is %T", reply[0])
	}
	if len(reply) > 1 {
		if n, ok = reply[1].(int64); !ok {
			return 0, 0, nil, nil, "", "", fmt.Errorf("script reply value is %T", reply[1])
		}
	}
	if code == codeTaken {
		if len(reply) != 6 {
			return 0, 0, nil, nil, "", "", fmt.Errorf("script reply has %d elements, want 6", len(reply))
		}
		if fields, ok = reply[2].([]any); !ok {
			return 0, 0, nil, nil, "", "", fmt.Errorf("script reply record is %T", reply[2])
		}
		ids, _ := reply[3].([]any)
		for _, id := range ids {
			s, _ := id.(string)
			prev = append(prev, s)
		}
		stamp, _ = reply[4].(string)
		replaced, _ = reply[5].(string)
	}
	return code, n, fields, prev, stamp, replaced, nil
}

// newLease makes the Lease for a taken lease and starts renewing it.
func (p *Pool) newLease(ctx context.Context, taskID string, token int64, fields []any, prev []string, execID string) (*Lease, error) {
	l := &Lease{
		execID:    execID,
		pool:      p,
		taskID:    taskID,
		token:     token,
		tokenArg:  strconv.FormatInt(token, 10),
		leaseKey:  p.leaseKey(taskID),
		recordKey: p.recordKey(taskID),
		lost:      make(chan struct{}),
	}
	if len(prev) > 0 {
		l.prevExec, l.otherExecs = prev[0], prev[1:]
	}
	rec, err := parseRecord(taskID, fields)
	if err != nil {
		p.unlock(ctx, []string{l.leaseKey}, []any{l.tokenArg})
		return nil, err
	}
	l.sandboxID, l.cwd, l.gen, l.key, l.createdAt = rec.SandboxID, rec.Cwd, rec.Generation, rec.IdempotencyKey, rec.CreatedAt
	l.spec = rec.Spec.WithDefaults()
	l.stop = p.keepAlive(ctx, []renewal{{lease: l.leaseKey, record: l.recordKey, token: l.tokenArg, task: taskID}}, func() {
		p.log.Warn("sandboxpool: lease lost to another holder", "task_id", taskID, "token", token)
		close(l.lost)
	})
	return l, nil
}

// create creates the lease's sandbox under its idempotency key and records
// the id.
func (p *Pool) create(ctx context.Context, l *Lease) error {
	// Noted as pending for Created (best effort: Created drops members
	// that are not pending, and a lost note only counts a pending create
	// as live for a moment).
	_ = p.rdb.SAdd(ctx, p.pendingKey, l.taskID).Err()
	id, err := p.gw.Create(ctx, l.key, l.spec.request(l.taskID))
	if err != nil {
		return fmt.Errorf("sandboxpool: create sandbox of task %q: %w", l.taskID, err)
	}
	if id == "" {
		return fmt.Errorf("sandboxpool: create sandbox of task %q: the gateway returned no id", l.taskID)
	}
	// The sandbox exists now: record it even if ctx ends, or the next
	// holder pays for another create call (which returns the same id).
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	ok, err := commitScript.Run(ctx, p.rdb, []string{l.leaseKey, l.recordKey, p.indexKey},
		l.tokenArg, id, p.nowArg(), l.taskID).Int64()
	if err != nil {
		return fmt.Errorf("sandboxpool: record sandbox %s of task %q: %w", id, l.taskID, err)
	}
	if ok == 0 {
		return fmt.Errorf("sandboxpool: record sandbox %s of task %q: %w", id, l.taskID, ErrStaleLease)
	}
	l.sandboxID = id
	_ = p.rdb.SRem(ctx, p.pendingKey, l.taskID).Err()
	return nil
}

// renewal is one lease that keepAlive renews.
type renewal struct {
	lease, record, token, task string
}

// renewEvery is how often a lease is renewed: 3/10 of its TTL, so that
// three renewals in a row can fail (a Redis blip) before it lapses, and a
// dead holder's lease lapses within a TTL and a renewal of its last one.
func (p *Pool) renewEvery() time.Duration { return p.cfg.LeaseTTL * 3 / 10 }

// keepAlive renews the leases every renewEvery until the returned stop is
// called. A lease that lapsed with nobody taking it since is taken back
// (renewScript). For a single lease, lost is called, and renewal ends, when
// another holder has it. The renewal outlives ctx's cancellation on
// purpose: only stop ends it.
func (p *Pool) keepAlive(ctx context.Context, leases []renewal, lost func()) (stop func()) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	every := p.renewEvery()
	keys := make([]string, 1, 1+2*len(leases))
	keys[0] = p.inflightKey
	args := make([]any, 2, 2+2*len(leases))
	args[0] = p.ttlArg
	for _, r := range leases {
		keys = append(keys, r.lease, r.record)
		args = append(args, r.token, r.task)
	}
	go func() {
		defer close(done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			args[1] = p.nowArg()
			rctx, rcancel := context.WithTimeout(ctx, every)
			res, err := renewScript.Run(rctx, p.rdb, keys, args...).Slice()
			rcancel()
			if err != nil {
				if ctx.Err() != nil || errors.Is(err, redis.ErrClosed) {
					return
				}
				// Keep trying: the lease holds for a full TTL, and a
				// renewal after it lapsed takes it back if nobody else
				// took it, or reports the loss.
				p.log.Warn("sandboxpool: renew leases", "leases", len(leases), "err", err)
				continue
			}
			if lost != nil && len(res) == 1 && res[0] == int64(0) {
				lost()
				return
			}
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

// unlock frees leases without recording a use.
func (p *Pool) unlock(ctx context.Context, keys []string, tokens []any) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if err := unlockScript.Run(ctx, p.rdb, keys, tokens...).Err(); err != nil {
		return fmt.Errorf("sandboxpool: unlock: %w", err)
	}
	return nil
}

// Release stores cwd as the task's tracked working directory (unless it is
// "") and now as its last use, marks the exec named at Acquire as collected
// (see Config.InFlightGrace), and frees the lease. It refuses, with an
// error wrapping ErrStaleLease, when the lease expired meanwhile. It runs
// even when ctx is cancelled, and a second call does nothing. When Redis
// cannot be reached it tries again for up to 20 s, so that a Redis restart
// does not leave the task's lease taken until its TTL lapses.
//
// One round trip to Redis.
func (p *Pool) Release(ctx context.Context, l *Lease, cwd string) error {
	return p.ReleaseWith(ctx, l, cwd, nil)
}

// ReleaseWith is Release with more work in the same round trip to Redis:
// also queues the caller's commands on the pipeline that carries the
// release, after it, so they run once the lease is free (a job's result
// write, say, so that whoever reads the result finds the task free). The
// commands run, under Release's own bounded context, even when the release
// is refused or was done before; their errors are in their own Cmders.
// When the release is tried again (Redis unreachable), also is called
// again, for a new pipeline: the Cmders of its last call hold the outcome.
// Scripts queued on the pipeline may be sent with EvalSha, to spare
// sending their text every time; the caller handles their NOSCRIPT (load
// the script, send it again: the release has happened by then).
func (p *Pool) ReleaseWith(ctx context.Context, l *Lease, cwd string, also func(redis.Pipeliner)) error {
	ctx = context.WithoutCancel(ctx)
	if l == nil || !l.released.CompareAndSwap(false, true) {
		if also != nil {
			ctx, cancel := context.WithTimeout(ctx, cleanupTimeout)
			defer cancel()
			pipe := p.rdb.Pipeline()
			also(pipe)
			_, _ = pipe.Exec(ctx)
		}
		return nil
	}
	l.stop()
	setCwd := "0"
	if cwd != "" {
		setCwd = "1"
	}
	keys := []string{l.leaseKey, l.recordKey, p.indexKey, p.inflightKey}
	args := []any{l.tokenArg, p.nowArg(), l.taskID, setCwd, cwd, l.execID}
	// A release that cannot reach Redis is tried again while Redis comes
	// back (a restart, a failover), for up to releaseRetryWindow: given up,
	// it would leave the task's lease taken until its TTL lapses, and the
	// task's next command (the job's own next delivery, if the caller's
	// write failed with it) waiting that long (reliability.TestRedisRestart).
	// A retry after a first try that did run and lost only its answer finds
	// the lease gone with the record's "tok" still its own, and does the same
	// again, which changes nothing (the caller's result write keeps the first
	// result). If a rescuer took the task meanwhile (Redis was away for
	// longer than the lease), the retry is refused with ErrStaleLease, and the
	// rescuer finishes the job.
	deadline := time.Now().Add(releaseRetryWindow)
	for {
		rel := p.releaseOnce(ctx, keys, args, also)
		ok, err := rel.Int64()
		if err != nil && retriable(err) && time.Now().Before(deadline) {
			p.log.Debug("sandboxpool: release: Redis unreachable; trying again", "task_id", l.taskID, "err", err)
			time.Sleep(releaseRetryPause) // ctx is never cancelled here: a release always runs
			continue
		}
		if err != nil {
			return fmt.Errorf("sandboxpool: release task %q: %w", l.taskID, err)
		}
		if ok == 0 {
			return fmt.Errorf("sandboxpool: release task %q: %w", l.taskID, ErrStaleLease)
		}
		if cwd != "" {
			l.cwd = cwd
		}
		return nil
	}
}

// How long, and how often, Release tries again when Redis does not answer.
// The window is what a worker waits on a failed job attempt too
// (jobs.redisOutageWait): longer than the lease TTL, so a rescuer may take
// the task over meanwhile, which fencing allows for.
const (
	releaseRetryWindow = 20 * time.Second
	releaseRetryPause  = 250 * time.Millisecond
)

// releaseOnce runs the release script, with the caller's commands after it
// on the same pipeline, under a bounded context of its own.
func (p *Pool) releaseOnce(ctx context.Context, keys []string, args []any, also func(redis.Pipeliner)) *redis.Cmd {
	ctx, cancel := context.WithTimeout(ctx, cleanupTimeout)
	defer cancel()
	if also == nil {
		return releaseScript.Run(ctx, p.rdb, keys, args...)
	}
	pipe := p.rdb.Pipeline()
	rel := releaseScript.EvalSha(ctx, pipe, keys, args...)
	also(pipe)
	_, _ = pipe.Exec(ctx) // each command's error is in its Cmder
	if redis.HasErrorPrefix(rel.Err(), "NOSCRIPT") {
		// Redis does not know the script (it restarted, or this is the
		// first call): load it and send the release alone. The caller's
		// commands ran already; their own NOSCRIPT is theirs to handle.
		if err := releaseScript.Load(ctx, p.rdb).Err(); err != nil {
			// Not loaded (Redis away again): a retriable error, so that
			// ReleaseWith tries again within its window.
			cmd := redis.NewCmd(ctx)
			cmd.SetErr(err)
			return cmd
		}
		return releaseScript.EvalSha(ctx, p.rdb, keys, args...)
	}
	return rel
}

// retriable reports whether a failed call to Redis is worth making again
// in a moment: the connection failed, or Redis is still loading its data
// after a restart. A Redis error answer (a script error, say) is not, nor
// is a closed client.
func retriable(err error) bool {
	if errors.Is(err, redis.ErrClosed) || errors.Is(err, context.Canceled) {
		return false
	}
	var rerr redis.Error
	if errors.As(err, &rerr) {
		msg := rerr.Error()
		return strings.HasPrefix(msg, "LOADING") || strings.HasPrefix(msg, "TRYAGAIN") || strings.HasPrefix(msg, "MASTERDOWN")
	}
	return true
}

// Abandon frees the lease without recording a use and leaves the exec named
// at Acquire marked as in flight: for a holder that stops waiting for an
// exec that goes on running (a worker shutting down). The next holder sees
// it in Lease.PrevExecID, and the reaper leaves the sandbox alone until the
// job's next delivery collects the exec (or Config.InFlightGrace passes).
// A rescuer may finish the exec's job (ClaimOrphans) once rescueIn has
// passed: 0 for at once (the holder is going away), longer for a holder
// whose job comes back soon by itself and should collect the exec first.
// It runs even when ctx is cancelled, and does nothing after Release or a
// first Abandon.
func (p *Pool) Abandon(ctx context.Context, l *Lease, rescueIn time.Duration) error {
	if l == nil || !l.released.CompareAndSwap(false, true) {
		return nil
	}
	l.stop()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	at := p.cfg.Now().Add(rescueIn).UnixMilli()
	pipe := p.rdb.Pipeline()
	unlockScript.Eval(ctx, pipe, []string{l.leaseKey}, l.tokenArg)
	if l.execID != "" {
		pipe.ZAddXX(ctx, p.inflightKey, redis.Z{Score: float64(at), Member: l.taskID})
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("sandboxpool: abandon task %q: %w", l.taskID, err)
	}
	return nil
}

// Yield frees the lease as if its holder had never taken it, for a holder
// that gives up before starting the exec named at Acquire (it was still
// waiting for Lease.PrevExecID to end): the record's in-flight exec goes
// back to that previous one, which may still be running, so that the next
// holder waits for it in turn, and the holder's own exec is not marked in
// flight. It runs even when ctx is cancelled, and does nothing after
// Release, Abandon or a first Yield.
func (p *Pool) Yield(ctx context.Context, l *Lease) error {
	if l == nil || !l.released.CompareAndSwap(false, true) {
		return nil
	}
	l.stop()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if err := yieldScript.Run(ctx, p.rdb, []string{l.leaseKey, l.recordKey, p.inflightKey}, l.tokenArg, l.execID, l.prevExec, l.taskID).Err(); err != nil {
		return fmt.Errorf("sandboxpool: yield task %q: %w", l.taskID, err)
	}
	return nil
}

// Recreate replaces the lease's sandbox, which the gateway says is gone: a
// new generation under a new idempotency key, with the cwd back to the
// spec's default. The new generation is recorded before the create, so a
// crash during it leaves a create that the next holder finishes, and so
// is the stamp (Intent.Stamp) of the holder's job. It fails with
// ErrStaleLease when the lease expired.
func (p *Pool) Recreate(ctx context.Context, l *Lease) error {
	// The tracked cwd goes back to "" — the new sandbox's own default — not
	// to Spec.Cwd spelt out: a gateway without isolation maps its default
	// cwd to the sandbox's directory, but cannot map a path a script cds to.
	return p.replace(ctx, l, "", nil)
}

// Rotate replaces the lease's sandbox, which is near the end of its
// lifetime, between two commands: it ends it (with a snapshot when the spec
// is persistent, so that the successor gets its files back) and creates
// its successor, keeping the tracked cwd.
func (p *Pool) Rotate(ctx context.Context, l *Lease) error {
	old, persistent := l.sandboxID, l.spec.Persistent
	// The successor is recorded first (a new key, no sandbox id yet, the
	// job's stamp moved to it, the exec disarmed): a holder that dies while
	// the old sandbox snapshots leaves a pending create, not a job that
	// looks as if it started in a sandbox now gone.
	return p.replace(ctx, l, l.cwd, func() error {
		if err := p.gw.Terminate(ctx, old, persistent); err != nil && !isGone(err) {
			return fmt.Errorf("sandboxpool: rotate sandbox %s of task %q: %w", old, l.taskID, err)
		}
		return nil
	})
}

// replace records a new generation of the lease's sandbox, runs before
// (ending the old one, for a rotation), and creates the new one.
func (p *Pool) replace(ctx context.Context, l *Lease, cwd string, before func() error) error {
	if l.released.Load() {
		return fmt.Errorf("sandboxpool: recreate sandbox of task %q: lease released: %w", l.taskID, ErrStaleLease)
	}
	key := p.cfg.NewKey()
	stampKey, stampArg := l.recordKey, ""
	if l.stampKey != "" {
		stampKey, stampArg = l.stampKey, "1"
	}
	gen, err := recreateScript.Run(ctx, p.rdb, []string{l.leaseKey, l.recordKey, stampKey}, l.tokenArg, key, cwd, p.nowArg(), stampArg, l.execID).Int64()
	if err != nil {
		return fmt.Errorf("sandboxpool: recreate sandbox of task %q: %w", l.taskID, err)
	}
	if gen == 0 {
		return fmt.Errorf("sandboxpool: recreate sandbox of task %q: %w", l.taskID, ErrStaleLease)
	}
	l.gen, l.key, l.sandboxID, l.cwd, l.recreated, l.createdAt = gen, key, "", cwd, true, p.cfg.Now()
	if before != nil {
		if err := before(); err != nil {
			return err
		}
	}
	return p.create(ctx, l)
}
