package sandboxpool

import (
	"context"
	"fmt"
	"strconv"

	"github.com/redis/go-redis/v9"
)

// Orphan is a task whose lease holder died (or stalled past the lease TTL)
// with execs in flight, claimed by a rescuer: Lease is the rescuer's, held
// and renewed like any other, and Execs are the execs left in flight with
// the notes their holders wrote (Intent.Note).
//
// The rescuer finishes one exec's job and then releases the lease with
// Lease.Rescue's exec (Pool.ReleaseWith), which clears its mark; execs it
// leaves are found again on a later claim.
type Orphan struct {
	Lease *Lease
	Execs []OrphanExec
}

// OrphanExec is one exec in flight in an orphaned task's sandbox.
type OrphanExec struct {
	ExecID string
	Note   string
	// Armed says its holder was about to start it (Pool.Arm); an exec not
	// armed was never started, and its job is left to asynq.
	Armed bool
}

// Rescue names the exec of the orphan that the holder now finishes, so
// that Release clears that exec's mark.
func (l *Lease) Rescue(execID string) { l.execID = execID }

// orphanPage bounds how many tasks one ClaimOrphans call looks at.
const orphanPage = 64

// ClaimOrphans claims the tasks whose lease lapsed while an exec was in
// flight with a note: their holder died, or stalled for longer than the
// lease TTL (a holder that comes back finds its lease lost and must not
// write: fencing). Each task is claimed by one rescuer across the fleet.
//
// Its cost follows what is due: it reads the in-flight index up to now (a
// task's entry moves on with every renewal of its lease), a page at a time.
func (p *Pool) ClaimOrphans(ctx context.Context) ([]Orphan, error) {
	now := p.cfg.Now().UnixMilli()
	tasks, err := p.rdb.ZRangeArgs(ctx, redis.ZRangeArgs{Key: p.inflightKey, Start: "-inf", Stop: now, ByScore: true, Count: orphanPage}).Result()
	if err != nil {
		return nil, fmt.Errorf("sandboxpool: rescue: read the in-flight index: %w", err)
	}
	if len(tasks) == 0 {
		return nil, nil
	}
	keys := make([]string, 2, 2+2*len(tasks))
	keys[0], keys[1] = p.inflightKey, p.fenceKey
	args := make([]any, 2, 2+len(tasks))
	args[0], args[1] = p.ttlArg, strconv.FormatInt(now, 10)
	for _, t := range tasks {
		keys = append(keys, p.leaseKey(t), p.recordKey(t))
		args = append(args, t)
	}
	replies, err := orphanScript.Run(ctx, p.rdb, keys, args...).Slice()
	if err != nil {
		return nil, fmt.Errorf("sandboxpool: rescue: claim: %w", err)
	}
	var out []Orphan
	for i, r := range replies {
		r, _ := r.([]any)
		if len(r) < 6 || r[0] != int64(2) {
			continue
		}
		tok, _ := r[1].(int64)
		str := func(v any) string { s, _ := v.(string); return s }
		l := &Lease{
			pool:      p,
			taskID:    tasks[i],
			token:     tok,
			tokenArg:  strconv.FormatInt(tok, 10),
			leaseKey:  p.leaseKey(tasks[i]),
			recordKey: p.recordKey(tasks[i]),
			sandboxID: str(r[2]),
			key:       str(r[3]),
			cwd:       str(r[4]),
			spec:      Spec{Cwd: str(r[5])}.WithDefaults(),
			lost:      make(chan struct{}),
		}
		l.stop = p.keepAlive(ctx, []renewal{{lease: l.leaseKey, record: l.recordKey, token: l.tokenArg, task: l.taskID}}, func() {
			p.log.Warn("sandboxpool: rescue lease lost to another holder", "task_id", l.taskID, "token", tok)
			close(l.lost)
		})
		o := Orphan{Lease: l}
		for j := 6; j+2 < len(r); j += 3 {
			o.Execs = append(o.Execs, OrphanExec{ExecID: str(r[j]), Note: str(r[j+1]), Armed: str(r[j+2]) == "1"})
		}
		out = append(out, o)
	}
	return out, nil
}
