package health

import "github.com/prometheus/client_golang/prometheus"

// metrics are the checker's Prometheus metrics. A nil *metrics records
// nothing.
type metrics struct {
	healthy     *prometheus.GaugeVec
	checks      *prometheus.CounterVec
	transitions *prometheus.CounterVec
	inFlight    prometheus.Gauge
	late        prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	if reg == nil {
		return nil
	}
	m := &metrics{
		healthy: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "switchman_backend_healthy",
			Help: "1 when the backend passes its health check, 0 when it fails; absent while its first check is pending.",
		}, []string{"service", "backend"}),
		checks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "switchman_health_checks_total",
			Help: "Health checks run, by service and result (success, failure).",
		}, []string{"service", "result"}),
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "switchman_health_transitions_total",
			Help: "Backend state changes, by service and new state (healthy, unhealthy); a first result counts.",
		}, []string{"service", "to"}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "switchman_health_checks_in_flight",
			Help: "Health checks running now (bounded by the concurrency limit).",
		}),
		late: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "switchman_health_checks_late_total",
			Help: "Checks started more than 100ms after they were due (the concurrency limit or the CPU cannot keep up).",
		}),
	}
	reg.MustRegister(m.healthy, m.checks, m.transitions, m.inFlight, m.late)
	return m
}

// checkCounters returns a service's counters of successful and failed
// checks (nil, nil without metrics), looked up once per service so a check
// only increments one.
func (m *metrics) checkCounters(service string) (ok, failed prometheus.Counter) {
	if m == nil {
		return nil, nil
	}
	return m.checks.WithLabelValues(service, "success"), m.checks.WithLabelValues(service, "failure")
}

func (m *metrics) transition(k Key, healthy bool) {
	if m == nil {
		return
	}
	v, to := 0.0, "unhealthy"
	if healthy {
		v, to = 1, "healthy"
	}
	m.healthy.WithLabelValues(k.Service, k.Addr.String()).Set(v)
	m.transitions.WithLabelValues(k.Service, to).Inc()
}

func (m *metrics) forget(k Key) {
	if m == nil {
		return
	}
	m.healthy.DeleteLabelValues(k.Service, k.Addr.String())
}

func (m *metrics) running(n int) {
	if m != nil {
		m.inFlight.Set(float64(n))
	}
}

func (m *metrics) lateStart() {
	if m != nil {
		m.late.Inc()
	}
}
