package sandboxpool

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Terminate ends the sandbox of taskID at once: it takes the task's lease
// (waiting like Acquire, so a running command finishes first), terminates
// the sandbox at the gateway (with a snapshot when the spec is persistent),
// and deletes the record. A task without a record, or whose sandbox the
// gateway no longer knows, is no error, so Terminate is safe to repeat.
//
// A record whose create never recorded an id is just deleted: if the
// gateway made that sandbox, its own idle timeout ends it.
func (p *Pool) Terminate(ctx context.Context, taskID string) error {
	return p.terminate(ctx, taskID, Intent{})
}

// TerminateIdle is Terminate for a task whose sandbox is idle: it fails at
// once with ErrBusy when the lease is held (a command runs), and with
// ErrVetoed when one of the checks holds (commands wait), tested in the
// same atomic step as the take.
func (p *Pool) TerminateIdle(ctx context.Context, taskID string, unless []Check) error {
	return p.terminate(ctx, taskID, Intent{Unless: unless, noWait: true})
}

func (p *Pool) terminate(ctx context.Context, taskID string, in Intent) error {
	l, err := p.take(ctx, taskID, nil, in)
	if err != nil || l == nil {
		return err
	}
	if l.sandboxID != "" {
		if err := p.gw.Terminate(ctx, l.sandboxID, l.spec.Persistent); err != nil && !isGone(err) {
			l.released.Store(true)
			l.stop()
			p.unlock(ctx, []string{l.leaseKey}, []any{l.tokenArg})
			return fmt.Errorf("sandboxpool: terminate sandbox %s of task %q: %w", l.sandboxID, taskID, err)
		}
	}
	l.released.Store(true)
	l.stop()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	res, err := deleteScript.Run(ctx, p.rdb, []string{p.indexKey, p.tasksKey, l.leaseKey, l.recordKey, p.tombKey(taskID)}, p.tombArg, l.tokenArg, taskID).Slice()
	if err != nil {
		return fmt.Errorf("sandboxpool: delete record of task %q: %w", taskID, err)
	}
	if len(res) != 1 || res[0] != int64(1) {
		return fmt.Errorf("sandboxpool: delete record of task %q: %w", taskID, ErrStaleLease)
	}
	return nil
}

// Reaping works in pages of reapPage expired tasks, terminating up to
// reapConcurrency sandboxes of a page at a time.
const (
	reapPage        = 256
	reapConcurrency = 16
)

// ReapIdle terminates the sandboxes last used more than ttl before now
// whose lease is free, and deletes their records; busy ones are skipped
// (their holder's release marks them used), and so are those that hold an
// exec whose job has not collected it yet, for Config.InFlightGrace. It
// returns how many it reaped.
//
// Its cost follows the number of expired records, not the pool's size: it
// reads them from the last-use index a page at a time, claims each page
// atomically (a task is claimed only while still expired and free, so
// concurrent reapers terminate each sandbox once), terminates the claimed
// sandboxes at the gateway, and deletes their records. A termination that
// fails leaves its record for the next run, and makes the error.
func (p *Pool) ReapIdle(ctx context.Context, now time.Time, ttl time.Duration) (reaped int, err error) {
	if ttl <= 0 {
		return 0, fmt.Errorf("sandboxpool: reap: idle TTL %v is not positive", ttl)
	}
	cutoff := strconv.FormatInt(now.Add(-ttl).UnixMilli(), 10)
	inflightCutoff := strconv.FormatInt(now.Add(-max(ttl, p.cfg.InFlightGrace)).UnixMilli(), 10)
	rng := &redis.ZRangeBy{Min: "-inf", Max: "(" + cutoff, Count: reapPage}
	var (
		failed   int
		firstErr error
	)
	for {
		// Busy and failed tasks stay in the index, so the next page
		// starts after them. If a task skipped as busy was in fact
		// another reaper's claim that is deleted since, the offset
		// overshoots; another pass then catches what it passed over.
		var offset, busyPass, reapedPass int
		for {
			rng.Offset = int64(offset)
			tasks, err := p.rdb.ZRangeByScore(ctx, p.indexKey, rng).Result()
			if err != nil {
				return reaped + reapedPass, fmt.Errorf("sandboxpool: reap: read the index: %w", err)
			}
			if len(tasks) == 0 {
				break
			}
			r, busy, f, ferr, err := p.reapPage(ctx, tasks, cutoff, inflightCutoff)
			reapedPass += r
			busyPass += busy
			failed += f
			offset += busy + f
			if firstErr == nil {
				firstErr = ferr
			}
			if err != nil {
				return reaped + reapedPass, err
			}
			if len(tasks) < reapPage {
				break
			}
		}
		reaped += reapedPass
		if busyPass == 0 || reapedPass == 0 {
			break
		}
	}
	if failed > 0 {
		return reaped, fmt.Errorf("sandboxpool: reap: %d terminations failed, the first: %w", failed, firstErr)
	}
	return reaped, nil
}

// claim is a task the reaper took the lease of.
type claim struct {
	task       string
	token      string
	sandboxID  string
	persistent bool
	err        error
}

// reapPage claims, terminates and deletes the expired tasks of one page.
// It returns how many it reaped, found busy, and failed to terminate, the
// first termination error, and err when Redis failed.
func (p *Pool) reapPage(ctx context.Context, tasks []string, cutoff, inflightCutoff string) (reaped, busy, failed int, firstFail, err error) {
	keys := make([]string, 3, 3+2*len(tasks))
	keys[0], keys[1], keys[2] = p.indexKey, p.fenceKey, p.inflightKey
	args := make([]any, 3, 3+len(tasks))
	args[0], args[1], args[2] = p.ttlArg, cutoff, inflightCutoff
	for _, t := range tasks {
		keys = append(keys, p.leaseKey(t), p.recordKey(t))
		args = append(args, t)
	}
	replies, err := claimScript.Run(ctx, p.rdb, keys, args...).Slice()
	if err != nil {
		return 0, 0, 0, nil, fmt.Errorf("sandboxpool: reap: claim: %w", err)
	}
	if len(replies) != len(tasks) {
		return 0, 0, 0, nil, fmt.Errorf("sandboxpool: reap: claim: %d replies for %d tasks", len(replies), len(tasks))
	}
	claims := make([]claim, 0, len(tasks))
	for i, r := range replies {
		r, _ := r.([]any)
		if len(r) == 0 {
			return 0, 0, 0, nil, fmt.Errorf("sandboxpool: reap: claim: bad reply %v", replies[i])
		}
		switch r[0] {
		case int64(1):
			busy++
		case int64(2):
			if len(r) != 4 {
				return 0, 0, 0, nil, fmt.Errorf("sandboxpool: reap: claim: bad reply %v", r)
			}
			tok, _ := r[1].(int64)
			id, _ := r[2].(string)
			persistent, _ := r[3].(string)
			claims = append(claims, claim{task: tasks[i], token: strconv.FormatInt(tok, 10), sandboxID: id, persistent: persistent == "1"})
		}
	}
	if len(claims) == 0 {
		return 0, busy, 0, nil, nil
	}

	// Keep the claims alive while the gateway works: a claim that expired
	// mid-terminate could be claimed again by another reaper.
	leaseKeys := make([]string, len(claims))
	renewals := make([]renewal, len(claims))
	for i, c := range claims {
		leaseKeys[i] = p.leaseKey(c.task)
		renewals[i] = renewal{lease: leaseKeys[i], record: p.recordKey(c.task), token: c.token, task: c.task}
	}
	stop := p.keepAlive(ctx, renewals, nil)
	p.terminateAll(ctx, claims)
	stop()

	// Delete what was terminated, unlock what was not.
	delKeys := []string{p.indexKey, p.tasksKey}
	delArgs := []any{p.tombArg}
	var unlockArgs []any
	var unlockKeys []string
	for i, c := range claims {
		if c.err != nil {
			failed++
			if firstFail == nil {
				firstFail = fmt.Errorf("sandbox %s of task %q: %w", c.sandboxID, c.task, c.err)
			}
			unlockKeys = append(unlockKeys, leaseKeys[i])
			unlockArgs = append(unlockArgs, c.token)
			continue
		}
		delKeys = append(delKeys, leaseKeys[i], p.recordKey(c.task), p.tombKey(c.task))
		delArgs = append(delArgs, c.token, c.task)
	}
	if len(unlockKeys) > 0 {
		if uerr := p.unlock(ctx, unlockKeys, unlockArgs); uerr != nil {
			// The claims expire on their own after LeaseTTL.
			p.log.Warn("sandboxpool: reap: unlock failed terminations", "err", uerr)
		}
	}
	if len(delArgs) > 1 {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
		defer cancel()
		res, derr := deleteScript.Run(dctx, p.rdb, delKeys, delArgs...).Slice()
		if derr != nil {
			return 0, busy, failed, firstFail, fmt.Errorf("sandboxpool: reap: delete records: %w", derr)
		}
		for _, v := range res {
			if v == int64(1) {
				reaped++
			}
		}
	}
	return reaped, busy, failed, firstFail, nil
}

// terminateAll terminates the claimed sandboxes at the gateway, at most
// reapConcurrency at a time, setting each claim's err. A pending record
// (no sandbox id) has nothing to terminate; a sandbox the gateway does not
// know is already gone.
func (p *Pool) terminateAll(ctx context.Context, claims []claim) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(reapConcurrency, len(claims)) {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(claims) {
					return
				}
				c := &claims[i]
				if c.sandboxID == "" {
					continue
				}
				if err := p.gw.Terminate(ctx, c.sandboxID, c.persistent); err != nil && !isGone(err) {
					c.err = err
				}
			}
		})
	}
	wg.Wait()
}
