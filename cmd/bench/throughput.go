package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/hibiken/asynq"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/jobs"
	"github.com/boxq/boxq/wrap"
)

// enqueuers is how many goroutines enqueue a batch, for the pipeline and
// for plain asynq alike.
const enqueuers = 8

// runner runs one round of a throughput measurement: n commands, and the
// rate it got, per second.
type runner interface {
	round(ctx context.Context, n int) (float64, error)
	close() error
}

// compare runs rounds of a and b in turn, so that both see the same
// machine (other load comes and goes), and returns every round's rate.
func compare(ctx context.Context, a, b runner, n, rounds int) (ra, rb []float64, err error) {
	for range rounds {
		va, err := a.round(ctx, n)
		if err != nil {
			return nil, nil, err
		}
		vb, err := b.round(ctx, n)
		if err != nil {
			return nil, nil, err
		}
		ra, rb = append(ra, va), append(rb, vb)
	}
	return ra, rb, nil
}

// pairRatio is the median of a[i]/b[i]: rounds run in turn, so each pair
// saw about the same machine, and the ratio of a pair cancels load that
// came and went between pairs.
func pairRatio(a, b []float64) float64 {
	rs := make([]float64, 0, len(a))
	for i := range min(len(a), len(b)) {
		if b[i] > 0 {
			rs = append(rs, a[i]/b[i])
		}
	}
	return median(rs)
}

// median of vs (which it sorts).
func median(vs []float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	slices.Sort(vs)
	if len(vs)%2 == 1 {
		return vs[len(vs)/2]
	}
	return (vs[len(vs)/2-1] + vs[len(vs)/2]) / 2
}

// directRunner sends `true` straight to the gateway from conc concurrent
// clients, over a fixed set of sandboxes. Like the queue, it runs one
// command at a time per sandbox.
type directRunner struct {
	client *gateway.Client
	ids    []string
	locks  []sync.Mutex
	conc   int
	next   atomic.Int64 // exec i runs in sandbox i % len(ids)
}

func (e *env) newDirectRunner(ctx context.Context, sandboxes, conc int) (*directRunner, error) {
	client, err := e.client(e.gw)
	if err != nil {
		return nil, err
	}
	d := &directRunner{client: client, ids: make([]string, sandboxes), locks: make([]sync.Mutex, sandboxes), conc: conc}
	if err := parallel(ctx, sandboxes, min(conc, 32), func(i int) error {
		id, err := client.Create(ctx, uuid.NewString(), gateway.CreateRequest{Cwd: gateway.DefaultCwd})
		d.ids[i] = id
		return err
	}); err != nil {
		d.close()
		return nil, err
	}
	// Warm up: one exec per sandbox, as the pipeline's tasks get.
	if _, err := d.round(ctx, sandboxes); err != nil {
		d.close()
		return nil, err
	}
	return d, nil
}

func (d *directRunner) round(ctx context.Context, n int) (float64, error) {
	start := time.Now()
	err := parallel(ctx, n, d.conc, func(int) error {
		sb := int(d.next.Add(1)-1) % len(d.ids)
		d.locks[sb].Lock()
		defer d.locks[sb].Unlock()
		st, err := d.client.Run(ctx, d.ids[sb], gateway.StartRequest{ExecID: uuid.NewString(), Command: "true", TimeoutMs: 60_000})
		if err != nil {
			return err
		}
		if st.Status != gateway.StatusCompleted {
			return fmt.Errorf("direct exec: %s, rc %d: %s", st.Status, st.RC(), st.Output)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

func (d *directRunner) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return parallel(ctx, len(d.ids), 32, func(i int) error {
		if d.ids[i] == "" {
			return nil
		}
		return d.client.Terminate(ctx, d.ids[i], false)
	})
}

// pipelineRunner sends `true` jobs over a fixed set of tasks through Redis
// and an in-process worker.
type pipelineRunner struct {
	rig    *rig
	prefix string
	tasks  int
	next   int // job i runs in task i % tasks
}

// newPipelineRunner starts a worker with concurrency conc over gw and runs
// one job per task, so that every task's sandbox exists, as the direct
// client's do.
func (e *env) newPipelineRunner(ctx context.Context, gw fullGateway, tasks, conc int) (*pipelineRunner, error) {
	r, err := e.startRig(ctx, gw, conc, e.opts.checkInterval)
	if err != nil {
		return nil, err
	}
	p := &pipelineRunner{rig: r, prefix: "tp-" + uuid.NewString()[:8] + "-", tasks: tasks}
	if _, err := p.round(ctx, tasks); err != nil {
		r.stop()
		return nil, err
	}
	return p, nil
}

// round runs n jobs and returns jobs per second from the first enqueue to
// the last result seen by the producer.
func (p *pipelineRunner) round(ctx context.Context, n int) (float64, error) {
	js := make([]jobs.Job, n)
	for i := range js {
		js[i] = jobs.Job{ID: uuid.NewString(), TaskID: fmt.Sprintf("%s%d", p.prefix, p.next%p.tasks), Command: "true"}
		p.next++
	}
	took, err := runBatch(ctx, p.rig.prod, js)
	if err != nil {
		return 0, err
	}
	return float64(n) / took.Seconds(), nil
}

func (p *pipelineRunner) close() error { return p.rig.stop() }

// runBatch enqueues js with a few concurrent enqueuers, then waits for
// every result, and returns the time from the first enqueue to the last
// result. Every result must be a command that completed with rc 0.
func runBatch(ctx context.Context, prod *jobs.Producer, js []jobs.Job) (time.Duration, error) {
	w, err := prod.Subscribe(ctx)
	if err != nil {
		return 0, err
	}
	defer w.Close()
	enq := make([]jobs.Enqueued, len(js))
	start := time.Now()
	if err := parallel(ctx, len(js), enqueuers, func(i int) error {
		e, err := prod.Enqueue(ctx, js[i], w.Channel())
		enq[i] = e
		return err
	}); err != nil {
		return 0, err
	}
	for _, e := range enq {
		w.Add(e)
	}
	for range js {
		res, err := w.Next(ctx)
		if err != nil {
			return 0, err
		}
		if res.Status != jobs.StatusCompleted || res.ReturnCode != 0 {
			return 0, fmt.Errorf("job %s: %s, rc %d: %s%s", res.ID, res.Status, res.ReturnCode, res.Error, res.Output)
		}
	}
	return time.Since(start), nil
}

// noopRunner runs tasks through plain asynq on the same Redis, with a
// handler that does nothing: the queue's own cost. The tasks carry the
// payload and the options a boxq exec job has (id, retention, retries,
// timeout), so that the queue does the same work for each.
type noopRunner struct {
	srv            *asynq.Server
	client         *asynq.Client
	close1, close2 func() error
	count, target  atomic.Int64
	done           chan struct{}
}

func (e *env) newNoopRunner(ctx context.Context, conc int) (*noopRunner, error) {
	rdb, prdb, err := e.clients(ctx, conc)
	if err != nil {
		return nil, err
	}
	r := &noopRunner{client: asynq.NewClientFromRedisClient(prdb), close1: rdb.Close, close2: prdb.Close, done: make(chan struct{}, 1)}
	r.srv = asynq.NewServerFromRedisClient(rdb, asynq.Config{
		Concurrency:       conc,
		Queues:            map[string]int{jobs.DefaultQueue: 1},
		TaskCheckInterval: e.opts.effectiveCheckInterval(),
		LogLevel:          asynq.ErrorLevel,
	})
	if err := r.srv.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		if r.count.Add(1) == r.target.Load() {
			r.done <- struct{}{}
		}
		return nil
	})); err != nil {
		rdb.Close()
		prdb.Close()
		return nil, err
	}
	if _, err := r.round(ctx, 200); err != nil { // warm up
		r.close()
		return nil, err
	}
	return r, nil
}

func (r *noopRunner) round(ctx context.Context, n int) (float64, error) {
	r.count.Store(0)
	r.target.Store(int64(n))
	start := time.Now()
	err := parallel(ctx, n, enqueuers, func(i int) error {
		p, err := jobs.NewExecTask(jobs.ExecPayload{
			Job:   jobs.Job{TaskID: fmt.Sprintf("noop-%d", i%200), Command: "true"},
			Nonce: wrap.NewNonce(), Notify: "boxq:notify:" + uuid.NewString(), QueuedAtMs: time.Now().UnixMilli(),
		})
		if err != nil {
			return err
		}
		_, err = r.client.EnqueueContext(ctx, asynq.NewTask("bench:noop", p.Payload()),
			asynq.TaskID(uuid.NewString()), asynq.Queue(jobs.DefaultQueue), asynq.MaxRetry(8),
			asynq.Retention(24*time.Hour), asynq.Timeout(jobs.DefaultTimeout+2*time.Minute))
		return err
	})
	if err != nil {
		return 0, err
	}
	select {
	case <-r.done:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

func (r *noopRunner) close() error {
	r.srv.Shutdown()
	return errors.Join(r.close1(), r.close2())
}

// parallel calls f(0..n-1) from conc goroutines and returns the first
// error; after an error the remaining calls are skipped.
func parallel(ctx context.Context, n, conc int, f func(i int) error) error {
	var (
		next     atomic.Int64
		firstErr error
		once     sync.Once
		failed   atomic.Bool
		wg       sync.WaitGroup
	)
	for range max(1, min(conc, n)) {
		wg.Go(func() {
			for !failed.Load() && ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					once.Do(func() { firstErr = err })
					failed.Store(true)
					return
				}
			}
		})
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return firstErr
}
