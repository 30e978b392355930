// Package logtest is a slog handler for tests that keeps every record, so
// a test can assert on what was logged.
package logtest

import (
	"context"
	"log/slog"
	"sync"
)

// Recorder is a slog.Handler that keeps every record. It is safe for
// concurrent use.
type Recorder struct {
	mu   sync.Mutex
	recs []slog.Record
}

// Enabled accepts every level.
func (r *Recorder) Enabled(context.Context, slog.Level) bool { return true }

// Handle keeps a copy of rec.
func (r *Recorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	r.recs = append(r.recs, rec.Clone())
	r.mu.Unlock()
	return nil
}

// WithAttrs returns r (attributes added this way are not kept).
func (r *Recorder) WithAttrs([]slog.Attr) slog.Handler { return r }

// WithGroup returns r.
func (r *Recorder) WithGroup(string) slog.Handler { return r }

// Records returns the records kept so far.
func (r *Recorder) Records() []slog.Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]slog.Record(nil), r.recs...)
}
