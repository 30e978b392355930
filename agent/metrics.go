package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the loop's Prometheus metrics. A nil *Metrics records nothing.
type Metrics struct {
	reconcile    prometheus.Histogram
	services     *prometheus.GaugeVec
	watchRestart prometheus.Counter
	revision     prometheus.Gauge
}

// NewMetrics registers the loop's metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		reconcile: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "switchman_reconcile_duration_seconds",
			Help:    "Time of one reconcile pass: evaluate, render and apply to every driver.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18),
		}),
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
	}
	reg.MustRegister(m.reconcile, m.services, m.watchRestart, m.revision)
	return m
}

// WatchRestarted counts one re-established watch.
func (m *Metrics) WatchRestarted(string) {
	if m != nil {
		m.watchRestart.Inc()
	}
}

func (m *Metrics) observe(took time.Duration, counts map[string]int, rev int64) {
	if m == nil {
		return
	}
	m.reconcile.Observe(took.Seconds())
	for _, s := range []string{"applied", "rejected", "failed", "failing_open"} {
		m.services.WithLabelValues(s).Set(float64(counts[s]))
	}
	if rev > 0 {
		m.revision.Set(float64(rev))
	}
}
