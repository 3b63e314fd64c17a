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
	inFlight   prometheus.Gauge
	reaped     prometheus.Counter
	rescues    prometheus.Counter
	seqRepairs prometheus.Counter
	liveSource func(context.Context) (int64, error)
}

// latencyBuckets span a 5 ms command to an hour-long one.
var latencyBuckets = []float64{.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600}

// NewMetrics registers boxq's metrics on reg. live reports the number of
// sandboxes the pool knows (nil: no gauge); inspector, when set, adds the
// asynq queue metrics (size, latency, processed, failed).
func NewMetrics(reg prometheus.Registerer, live func(context.Context) (int64, error), inspector *asynq.Inspector) (*Metrics, error) {
	h := func(name, help string) prometheus.Histogram {
		return prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "boxq", Name: name, Help: help, Buckets: latencyBuckets})
	}
	m := &Metrics{
		queueWait: h("queue_wait_seconds", "Time from enqueue to the start of the job's first handling."),
		acquire:   h("sandbox_acquire_seconds", "Time to acquire the task's sandbox lease (creating the sandbox if needed)."),
		execRun:   h("exec_run_seconds", "Time from exec start to its end, through the gateway."),
		endToEnd:  h("job_end_to_end_seconds", "Time from enqueue to the result being written."),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "boxq", Name: "results_total",
			Help: "Results written, by status (completed, timeout, cancelled, error)."}, []string{"status"}),
		gwErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "boxq", Name: "gateway_errors_total",
			Help: "Failed job attempts, by class (transient, capacity, permanent)."}, []string{"class"}),
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
	cs := []prometheus.Collector{m.queueWait, m.acquire, m.execRun, m.endToEnd, m.results, m.gwErrors, m.inFlight, m.reaped, m.rescues, m.seqRepairs}
	for _, s := range []string{StatusCompleted, StatusTimeout, StatusCancelled, StatusError} {
		m.results.WithLabelValues(s)
	}
	for _, c := range []gateway.Class{gateway.Transient, gateway.Capacity, gateway.Permanent} {
		m.gwErrors.WithLabelValues(c.String())
	}
	if live != nil {
		cs = append(cs, prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "boxq", Name: "sandboxes_live",
			Help: "Sandboxes the pool knows, across all workers."}, func() float64 {
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

func (m *Metrics) observeGatewayError(err error) {
	if m == nil {
		return
	}
	class := gateway.Classify(err)
	if errors.Is(err, sandboxpool.ErrBusy) {
		class = gateway.Capacity
	}
	m.gwErrors.WithLabelValues(class.String()).Inc()
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
