// Package sandboxpool maps task ids to sandboxes, in Redis, for a fleet of
// workers.
//
// The pool is what makes a fleet of workers behave like one careful user of
// each sandbox: a task's commands run one at a time whichever workers hold
// them (an exclusive, fenced, expiring lease per task), a task gets exactly
// one sandbox even when a worker dies in the middle of creating it (the
// create's idempotency key is fixed in Redis before the call), idle
// sandboxes are terminated at a cost that follows the number that expire,
// and an optional cap bounds the sandboxes alive across all workers.
//
// The common path costs one Redis round trip to acquire and one to release.
package sandboxpool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/boxq/boxq/gateway"
	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

// Gateway is what the pool needs of the sandbox gateway. *gateway.Client
// implements it.
type Gateway interface {
	Create(ctx context.Context, idempotencyKey string, req gateway.CreateRequest) (sandboxID string, err error)
	Terminate(ctx context.Context, sandboxID string, snapshot bool) error
}

var (
	// ErrBusy means the task's lease is held elsewhere, or the pool is at
	// capacity, for longer than Config.AcquireWait: try again soon. It is
	// a wait, not a failure.
	ErrBusy = errors.New("sandboxpool: busy")
	// ErrFull is the ErrBusy of a pool at capacity (Config.MaxSandboxes)
	// rather than of a lease held elsewhere; it wraps ErrBusy.
	ErrFull = fmt.Errorf("%w (pool at capacity)", ErrBusy)
	// ErrVetoed means AcquireUnless found one of its checks set, and took
	// nothing.
	ErrVetoed = errors.New("sandboxpool: vetoed by a check")
	// ErrStaleLease means a lease expired (and may have been taken by
	// someone else) before its holder wrote through it; the write was
	// refused.
	ErrStaleLease = errors.New("sandboxpool: stale lease")
)

// Config configures a Pool. The zero value of each field means its default.
type Config struct {
	// Prefix starts every Redis key of the pool. Default "boxq:".
	Prefix string
	// LeaseTTL is how long a lease outlives its holder: a holder that
	// crashes blocks its task for at most this long, and a rescuer finds
	// the exec it left this long after its last renewal. Leases are renewed
	// every 3/10 of it while held (each renewal is one script call per
	// held lease). A holder that stalls for longer keeps its lease if
	// nobody took it meanwhile. Default 5s; at least 50ms.
	LeaseTTL time.Duration
	// AcquireWait is how long Acquire and Terminate wait for a busy lease
	// or a free slot before giving up with ErrBusy. Default 2s; negative:
	// try once, do not wait.
	AcquireWait time.Duration
	// MaxSandboxes caps the sandboxes (pending creates included) alive
	// across every worker sharing the Redis and Prefix. 0: no cap.
	MaxSandboxes int
	// Logger receives what the pool handles itself: renewals that fail or
	// find the lease lost. Default: discard.
	Logger *slog.Logger
	// Now is the clock of the records' timestamps and of the last use the
	// reaper compares. Default time.Now. Lease expiry and waits use Redis
	// and real time.
	Now func() time.Time
	// NewKey returns a new idempotency key for a create. Default: a random
	// UUID.
	NewKey func() string
	// InFlightGrace is how long the reaper leaves alone a sandbox in which
	// a holder started an exec and vanished without collecting its result
	// (it crashed, or stopped waiting with Abandon): the job's next
	// delivery must find the exec there, in the same sandbox, to re-attach
	// to it instead of running the command again. Default 10m, the
	// reference gateway's retention of finished execs, past which a
	// re-delivery could not re-attach anyway.
	InFlightGrace time.Duration
	// TombstoneTTL is how long the pool remembers a task's sandbox after a
	// terminate or a reap ended it, so that the task's next sandbox is
	// known as a replacement (Lease.Recreated; a job's sandbox_recreated)
	// and a persistent task gets its cwd back. Default 24h, the default
	// retention of results.
	TombstoneTTL time.Duration
}

// Defaults of Config.
const (
	DefaultPrefix        = "boxq:"
	DefaultLeaseTTL      = 5 * time.Second
	DefaultAcquireWait   = 2 * time.Second
	DefaultInFlightGrace = 10 * time.Minute

	minLeaseTTL = 50 * time.Millisecond
)

func (c Config) withDefaults() Config {
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = DefaultLeaseTTL
	}
	if c.AcquireWait == 0 {
		c.AcquireWait = DefaultAcquireWait
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.NewKey == nil {
		c.NewKey = uuid.NewString
	}
	if c.InFlightGrace == 0 {
		c.InFlightGrace = DefaultInFlightGrace
	}
	if c.TombstoneTTL == 0 {
		c.TombstoneTTL = 24 * time.Hour
	}
	return c
}

func (c Config) validate() error {
	if c.LeaseTTL < minLeaseTTL {
		return fmt.Errorf("sandboxpool: lease TTL %v is below %v", c.LeaseTTL, minLeaseTTL)
	}
	if c.MaxSandboxes < 0 {
		return fmt.Errorf("sandboxpool: max sandboxes %d is negative", c.MaxSandboxes)
	}
	if c.InFlightGrace < 0 {
		return fmt.Errorf("sandboxpool: in-flight grace %v is negative", c.InFlightGrace)
	}
	return nil
}

// Timeouts of the calls that clean up after a holder, which run even when
// the holder's context is cancelled.
const cleanupTimeout = 5 * time.Second

// Pool hands out leases on the sandboxes of tasks. It is safe for concurrent
// use, and any number of Pools (in any number of processes) over the same
// Redis and Prefix share the same sandboxes.
type Pool struct {
	rdb redis.UniversalClient
	gw  Gateway
	cfg Config
	log *slog.Logger

	// Precomputed so the hot path does not build them per call.
	leasePrefix  string
	recordPrefix string
	indexKey     string
	tasksKey     string // the fan-out index (fanout.go)
	// pendingKey is a set of the tasks whose record awaits a create's
	// answer (sandbox_id ""), so that Created need not scan every record.
	// It may hold stale members (a worker that died mid-create): Created
	// checks each one and drops those that are not pending any more.
	pendingKey  string
	fenceKey    string
	inflightKey string
	tombPrefix  string
	tombArg     string // TombstoneTTL in ms
	ttlArg      string // LeaseTTL in ms
	capArg      string // MaxSandboxes
}

// New returns a Pool over rdb (the client asynq uses may be shared) and gw.
func New(rdb redis.UniversalClient, gw Gateway, cfg Config) (*Pool, error) {
	if rdb == nil {
		return nil, errors.New("sandboxpool: nil redis client")
	}
	if gw == nil {
		return nil, errors.New("sandboxpool: nil gateway")
	}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Pool{
		rdb:          rdb,
		gw:           gw,
		cfg:          cfg,
		log:          cfg.Logger,
		leasePrefix:  cfg.Prefix + "lease:",
		recordPrefix: cfg.Prefix + "sandbox:",
		indexKey:     cfg.Prefix + "sandboxes",
		tasksKey:     cfg.Prefix + "tasks",
		pendingKey:   cfg.Prefix + "creating",
		fenceKey:     cfg.Prefix + "fence",
		inflightKey:  cfg.Prefix + "inflight",
		tombPrefix:   cfg.Prefix + "gone:",
		tombArg:      strconv.FormatInt(cfg.TombstoneTTL.Milliseconds(), 10),
		ttlArg:       strconv.FormatInt(cfg.LeaseTTL.Milliseconds(), 10),
		capArg:       strconv.Itoa(cfg.MaxSandboxes),
	}, nil
}

func (p *Pool) leaseKey(taskID string) string  { return p.leasePrefix + taskID }
func (p *Pool) recordKey(taskID string) string { return p.recordPrefix + taskID }
func (p *Pool) tombKey(taskID string) string   { return p.tombPrefix + taskID }

func (p *Pool) nowArg() string { return strconv.FormatInt(p.cfg.Now().UnixMilli(), 10) }

// Live returns the number of sandboxes the pool holds records of (pending
// creates included): the count the capacity cap applies to.
func (p *Pool) Live(ctx context.Context) (int64, error) {
	n, err := p.rdb.ZCard(ctx, p.indexKey).Result()
	if err != nil {
		return 0, fmt.Errorf("sandboxpool: count sandboxes: %w", err)
	}
	return n, nil
}

// Created returns the number of sandboxes the gateway created for the pool
// and that it has not terminated: Live less the records whose create is
// pending or was refused (no sandbox id). It costs a round trip or two and
// one lookup per pending create, not a scan of the pool.
func (p *Pool) Created(ctx context.Context) (int64, error) {
	pipe := p.rdb.Pipeline()
	live := pipe.ZCard(ctx, p.indexKey)
	members := pipe.SMembers(ctx, p.pendingKey)
	if _, err := pipe.Exec(ctx); err != nil {
		return 0, fmt.Errorf("sandboxpool: count sandboxes: %w", err)
	}
	tasks := members.Val()
	if len(tasks) == 0 {
		return live.Val(), nil
	}
	pipe = p.rdb.Pipeline()
	ids := make([]*redis.SliceCmd, len(tasks))
	for i, task := range tasks {
		ids[i] = pipe.HMGet(ctx, p.recordKey(task), "gen", "sandbox_id")
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return 0, fmt.Errorf("sandboxpool: count pending creates: %w", err)
	}
	var pending int64
	var stale []any
	for i, c := range ids {
		v := c.Val()
		if len(v) == 2 && v[0] != nil && (v[1] == nil || v[1] == "") {
			pending++
		} else {
			stale = append(stale, tasks[i])
		}
	}
	if len(stale) > 0 {
		// A member whose create was answered, or whose record is gone,
		// since: best effort, the next count tries again.
		_ = p.rdb.SRem(ctx, p.pendingKey, stale...).Err()
	}
	return max(live.Val()-pending, 0), nil
}

// Record is what the pool keeps about a task's sandbox.
type Record struct {
	TaskID string
	// SandboxID is "" while the create is pending: sent (or about to be)
	// under IdempotencyKey, answer not yet recorded.
	SandboxID      string
	Generation     int64 // 1 for the first sandbox, +1 per Recreate
	Cwd            string
	Spec           Spec // as the sandbox was created
	IdempotencyKey string
	CreatedAt      time.Time
	LastUsed       time.Time
}

// Get returns the record of a task, and false when it has none.
func (p *Pool) Get(ctx context.Context, taskID string) (Record, bool, error) {
	vals, err := p.rdb.HMGet(ctx, p.recordKey(taskID), recordFields[:]...).Result()
	if err != nil {
		return Record{}, false, fmt.Errorf("sandboxpool: get record of task %q: %w", taskID, err)
	}
	if vals[fGen] == nil {
		return Record{}, false, nil
	}
	rec, err := parseRecord(taskID, vals)
	if err != nil {
		return Record{}, false, err
	}
	return rec, true, nil
}

// parseRecord reads the reply of HMGET recordFields.
func parseRecord(taskID string, vals []any) (Record, error) {
	if len(vals) != numFields {
		return Record{}, fmt.Errorf("sandboxpool: record of task %q: %d fields, want %d", taskID, len(vals), numFields)
	}
	var f [numFields]string
	for i, v := range vals {
		switch v := v.(type) {
		case string:
			f[i] = v
		case nil:
		default:
			return Record{}, fmt.Errorf("sandboxpool: record of task %q: field %s is %T", taskID, recordFields[i], v)
		}
	}
	var err error
	num := func(i int) int64 {
		if f[i] == "" {
			return 0
		}
		n, e := strconv.ParseInt(f[i], 10, 64)
		if e != nil && err == nil {
			err = fmt.Errorf("sandboxpool: record of task %q: field %s: %w", taskID, recordFields[i], e)
		}
		return n
	}
	rec := Record{
		TaskID:         taskID,
		SandboxID:      f[fSandboxID],
		Generation:     num(fGen),
		Cwd:            f[fCwd],
		IdempotencyKey: f[fKey],
		CreatedAt:      time.UnixMilli(num(fCreated)),
		LastUsed:       time.UnixMilli(num(fUsed)),
		Spec: Spec{
			Image:         f[fImage],
			MemoryMiB:     int(num(fMemoryMiB)),
			DiskMiB:       int(num(fDiskMiB)),
			Persistent:    f[fPersistent] == "1",
			Cwd:           f[fDefaultCwd],
			TimeoutMs:     num(fTimeoutMs),
			IdleTimeoutMs: num(fIdleTimeoutMs),
		},
	}
	if f[fCPU] != "" {
		cpu, e := strconv.ParseFloat(f[fCPU], 64)
		if e != nil && err == nil {
			err = fmt.Errorf("sandboxpool: record of task %q: field cpu: %w", taskID, e)
		}
		rec.Spec.CPU = cpu
	}
	if err != nil {
		return Record{}, err
	}
	return rec, nil
}

// isGone reports whether the gateway said it does not know a sandbox.
func isGone(err error) bool {
	var apiErr *gateway.APIError
	return errors.Is(err, gateway.ErrSandboxGone) ||
		errors.As(err, &apiErr) && apiErr.StatusCode == 404
}
