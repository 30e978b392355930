package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/switchman-lb/switchman/status"
)

// Metrics are the loop's Prometheus metrics. A nil *Metrics records nothing.
type Metrics struct {
	pass         prometheus.Histogram
	rendered     prometheus.Counter
	driver       *prometheus.HistogramVec
	services     *prometheus.GaugeVec
	watchRestart prometheus.Counter
	revision     prometheus.Gauge
	startup      *prometheus.GaugeVec
	maxRev       int64
}

// NewMetrics registers the loop's metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		pass: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "switchman_reconcile_duration_seconds",
			Help:    "Time the loop spent evaluating and rendering the services one batch of events touched (drivers run apart).",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 20),
		}),
		rendered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "switchman_services_reconciled_total",
			Help: "Services evaluated or rendered again because an event named them.",
		}),
		driver: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "switchman_driver_duration_seconds",
			Help:    "Time of one driver call: apply (the services that changed) or sync (the whole system, the repair path).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 22),
		}, []string{"driver", "kind"}),
		services: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "switchman_services",
			Help: "Services by state (applied, rejected, failed, failing_open).",
		}, []string{"state"}),
		watchRestart: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "switchman_watch_restarts_total",
			Help: "Times the etcd watch was re-established with a fresh list.",
		}),
		revision: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "switchman_last_applied_revision",
			Help: "The highest etcd revision of a service definition applied.",
		}),
		startup: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "switchman_first_pass_seconds",
			Help: "What the first pass after the start spent, by phase (etcd_list, evaluate_and_render, health_first_round, drivers, total).",
		}, []string{"phase"}),
	}
	reg.MustRegister(m.pass, m.rendered, m.driver, m.services, m.watchRestart, m.revision, m.startup)
	for _, s := range []string{status.StateApplied, status.StateRejected, status.StateFailed, "failing_open"} {
		m.services.WithLabelValues(s)
	}
	return m
}

// firstPass records the phases of the first pass.
func (m *Metrics) firstPass(phases []phase) {
	if m == nil {
		return
	}
	for _, p := range phases {
		m.startup.WithLabelValues(p.name).Set(p.took.Seconds())
	}
}

// WatchRestarted counts one re-established watch.
func (m *Metrics) WatchRestarted(string) {
	if m != nil {
		m.watchRestart.Inc()
	}
}

func (m *Metrics) observePass(took time.Duration, services int) {
	if m == nil {
		return
	}
	m.pass.Observe(took.Seconds())
	m.rendered.Add(float64(services))
}

func (m *Metrics) observeDriver(driver string, kind workKind, took time.Duration) {
	if m == nil {
		return
	}
	k := "apply"
	if kind == workSync {
		k = "sync"
	}
	m.driver.WithLabelValues(driver, k).Observe(took.Seconds())
}

// transition moves one service's count from its old status (when it had
// one) to its new one.
func (m *Metrics) transition(old status.Status, hadOld bool, cur status.Status) {
	if m == nil {
		return
	}
	if hadOld {
		m.count(old, -1)
	}
	m.count(cur, 1)
	if cur.State == status.StateApplied && cur.Revision > m.maxRev {
		m.maxRev = cur.Revision
		m.revision.Set(float64(cur.Revision))
	}
}

// forget drops a deleted service's count.
func (m *Metrics) forget(r *record) {
	if m != nil && r.published {
		m.count(r.status, -1)
	}
}

func (m *Metrics) count(st status.Status, d float64) {
	m.services.WithLabelValues(st.State).Add(d)
	if st.FailingOpen {
		m.services.WithLabelValues("failing_open").Add(d)
	}
}
