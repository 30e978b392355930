package health

// Status returns one target's state.
func (s *Scheduler) Status(k Key) (Status, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[k]
	if !ok {
		return Status{}, false
	}
	return Status{
		Healthy: e.st.healthy, Pending: e.st.pending, LastError: e.st.lastError,
		LastCheck: e.st.lastCheck, LastTransition: e.st.lastTransition,
		Successes: e.st.successes, Failures: e.st.failures, Check: e.checker.String(),
	}, true
}
