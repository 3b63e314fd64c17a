package jobs

import (
	"context"
	"errors"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/sandboxpool"
)

// Metrics are the worker's Prometheus metrics. A nil *Metrics records
// nothing, so handlers need no checks.
type Metrics struct {
	queueWait  prometheus.Histogram
	acquire    prometheus.Histogram
	execRun    prometheus.Histogram
	endToEnd   prometheus.Histogram
	results    *prometheus.CounterVec
	gwErrors   *prometheus.CounterVec
	waits      *prometheus.CounterVec
	inFlight   prometheus.Gauge
	reaped     prometheus.Counter
	rescues    prometheus.Counter
	seqRepairs prometheus.Counter
	liveSource func(context.Context) (int64, error)
}

// latencyBuckets span a 5 ms command to an hour-long one.
var latencyBuckets = []float64{.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600}

// NewMetrics registers boxq's metrics on reg. live reports the number of
// sandboxes the gateway has created for the pool (nil: no gauge; pending
// and refused creates must not count); inspector, when set, adds the asynq
// queue metrics (size, latency, processed, failed).
func NewMetrics(reg prometheus.Registerer, live func(context.Context) (int64, error), inspector *asynq.Inspector) (*Metrics, error) {
	h := func(name, help string) prometheus.Histogram {
		return prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "boxq", Name: name, Help: help, Buckets: latencyBuckets})
	}
	m := &Metrics{
		queueWait: h("queue_wait_seconds", "Time from enqueue to the first delivery that takes the job's sandbox to start its command, once per job (waits for the task's turn and for capacity included)."),
		acquire:   h("sandbox_acquire_seconds", "Time to acquire the task's sandbox lease (creating the sandbox if needed)."),
		execRun:   h("exec_run_seconds", "Time from exec start to its end, through the gateway."),
		endToEnd:  h("job_end_to_end_seconds", "Time from enqueue to the result being written."),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "boxq", Name: "results_total",
			Help: "Results written, by status (completed, timeout, cancelled, error)."}, []string{"status"}),
		gwErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "boxq", Name: "gateway_errors_total",
			Help: "Failed gateway calls and other faults of job attempts, by class (transient, capacity: the gateway's 429, permanent); boxq's own waits are in boxq_waits_total."}, []string{"class"}),
		waits: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "boxq", Name: "waits_total",
			Help: "Job deliveries put back to wait, by reason: turn (another command of the task runs), pool_full (-max-sandboxes reached), gateway_capacity (the gateway answered 429)."}, []string{"reason"}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "boxq", Name: "execs_in_flight",
			Help: "Exec jobs being handled by this worker."}),
		reaped: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "boxq", Name: "sandboxes_reaped_total",
			Help: "Idle sandboxes terminated by this worker's reaper."}),
		rescues: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "boxq", Name: "rescues_total",
			Help: "Commands of dead (or stalled) workers that this worker's rescuer took over."}),
		seqRepairs: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "boxq", Name: "sequence_repairs_total",
			Help: "Task sequences this worker's repair moved on (a head deleted or archived from the dashboard, or a producer that died mid-enqueue)."}),
		liveSource: live,
	}
	cs := []prometheus.Collector{m.queueWait, m.acquire, m.execRun, m.endToEnd, m.results, m.gwErrors, m.waits, m.inFlight, m.reaped, m.rescues, m.seqRepairs}
	for _, s := range []string{StatusCompleted, StatusTimeout, StatusCancelled, StatusError} {
		m.results.WithLabelValues(s)
	}
	for _, c := range []gateway.Class{gateway.Transient, gateway.Capacity, gateway.Permanent} {
		m.gwErrors.WithLabelValues(c.String())
	}
	for _, r := range []string{waitReasonTurn, waitReasonPoolFull, waitReasonGatewayCapacity} {
		m.waits.WithLabelValues(r)
	}
	if live != nil {
		cs = append(cs, prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "boxq", Name: "sandboxes_live",
			Help: "Sandboxes the gateway created for the pool and not yet terminated, across all workers (pending creates excluded)."}, func() float64 {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			n, err := live(ctx)
			if err != nil {
				return -1
			}
			return float64(n)
		}))
	}
	if inspector != nil {
		cs = append(cs, &queueCollector{insp: inspector})
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *Metrics) observeQueueWait(d time.Duration) {
	if m != nil && d >= 0 {
		m.queueWait.Observe(d.Seconds())
	}
}

func (m *Metrics) observeAcquire(d time.Duration) {
	if m != nil {
		m.acquire.Observe(d.Seconds())
	}
}

func (m *Metrics) observeExec(d time.Duration) {
	if m != nil {
		m.execRun.Observe(d.Seconds())
	}
}

func (m *Metrics) observeResult(r *Result) {
	if m == nil {
		return
	}
	m.results.WithLabelValues(r.Status).Inc()
	if !r.QueuedAt.IsZero() {
		m.endToEnd.Observe(r.FinishedAt.Sub(r.QueuedAt).Seconds())
	}
}

// The reasons of boxq_waits_total.
const (
	waitReasonTurn            = "turn"
	waitReasonPoolFull        = "pool_full"
	waitReasonGatewayCapacity = "gateway_capacity"
)

// observeGatewayError counts a failed attempt's error in
// boxq_gateway_errors_total, unless it is boxq's own wait (the task's
// lease held by another job, the pool at its cap): those are not the
// gateway's answers (observeWait counts them).
func (m *Metrics) observeGatewayError(err error) {
	if m == nil || errors.Is(err, sandboxpool.ErrBusy) {
		return
	}
	m.gwErrors.WithLabelValues(gateway.Classify(err).String()).Inc()
}

// observeWait counts a delivery put back to wait.
func (m *Metrics) observeWait(reason string) {
	if m != nil {
		m.waits.WithLabelValues(reason).Inc()
	}
}

func (m *Metrics) addInFlight(d float64) {
	if m != nil {
		m.inFlight.Add(d)
	}
}

func (m *Metrics) addRescue() {
	if m != nil {
		m.rescues.Inc()
	}
}

func (m *Metrics) addSeqRepairs(n int) {
	if m != nil {
		m.seqRepairs.Add(float64(n))
	}
}

func (m *Metrics) addReaped(n int) {
	if m != nil {
		m.reaped.Add(float64(n))
	}
}

// queueCollector exports asynq's per-queue numbers at scrape time.
type queueCollector struct {
	insp *asynq.Inspector
}

var (
	queueSizeDesc      = prometheus.NewDesc("asynq_queue_size", "Tasks in the queue, by state.", []string{"queue", "state"}, nil)
	queueLatencyDesc   = prometheus.NewDesc("asynq_queue_latency_seconds", "Age of the oldest pending task.", []string{"queue"}, nil)
	queueProcessedDesc = prometheus.NewDesc("asynq_tasks_processed_today", "Tasks processed today (UTC).", []string{"queue"}, nil)
	queueFailedDesc    = prometheus.NewDesc("asynq_tasks_failed_today", "Tasks failed today (UTC).", []string{"queue"}, nil)
)

func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- queueSizeDesc
	ch <- queueLatencyDesc
	ch <- queueProcessedDesc
	ch <- queueFailedDesc
}

func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	queues, err := c.insp.Queues()
	if err != nil {
		return
	}
	for _, q := range queues {
		info, err := c.insp.GetQueueInfo(q)
		if err != nil {
			continue
		}
		for state, n := range map[string]int{"pending": info.Pending, "active": info.Active, "scheduled": info.Scheduled,
			"retry": info.Retry, "archived": info.Archived, "completed": info.Completed} {
			ch <- prometheus.MustNewConstMetric(queueSizeDesc, prometheus.GaugeValue, float64(n), q, state)
		}
		ch <- prometheus.MustNewConstMetric(queueLatencyDesc, prometheus.GaugeValue, info.Latency.Seconds(), q)
		ch <- prometheus.MustNewConstMetric(queueProcessedDesc, prometheus.CounterValue, float64(info.Processed), q)
		ch <- prometheus.MustNewConstMetric(queueFailedDesc, prometheus.CounterValue, float64(info.Failed), q)
	}
}
