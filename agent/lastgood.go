package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/switchman-lb/switchman/internal/atomicfile"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/watcher"
)

// LastGood keeps every service's last good version on disk, one file per
// service written atomically, so that an agent restarted while etcd holds
// a bad version of a service still serves the good one. Writes happen in a
// goroutine of its own (Run), never in the loop; Save and Delete only queue.
// Run writes nothing before Start: the agent starts it once its first pass
// is done, so that a cold start's thousands of file writes do not compete
// with the data plane's programming (the versions are in etcd meanwhile).
type LastGood struct {
	dir string
	log *slog.Logger

	mu     sync.Mutex
	queue  map[string]*Input // nil value: delete the file
	onDisk map[string]string // name -> signature of what the file holds
	wake   chan struct{}
	idle   chan struct{} // closed while nothing is queued or being written
	busy   bool          // idle is open

	start     chan struct{} // closed by Start
	startOnce sync.Once
}

// lastGoodFile is one service's file.
type lastGoodFile struct {
	Version        int                      `json:"version"`
	CreateRevision int64                    `json:"create_revision"`
	Definition     lastGoodValue            `json:"definition"`
	Members        map[string]lastGoodValue `json:"members,omitempty"`
}

type lastGoodValue struct {
	Value       []byte `json:"value"`
	ModRevision int64  `json:"mod_revision"`
}

// OpenLastGood reads the records under dir (created 0700 when missing) and
// returns the store with what it holds, by service name. A file that
// cannot be read is logged and skipped.
func OpenLastGood(dir string, log *slog.Logger) (*LastGood, map[string]Input, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("last good versions: %w", err)
	}
	l := &LastGood{dir: dir, log: log, queue: map[string]*Input{}, onDisk: map[string]string{}, wake: make(chan struct{}, 1), idle: make(chan struct{}), start: make(chan struct{})}
	close(l.idle)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("last good versions: %w", err)
	}
	out := map[string]Input{}
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || !e.Type().IsRegular() || spec.ValidateName(name) != nil {
			continue
		}
		b, err := atomicfile.ReadBounded(filepath.Join(dir, e.Name()), 64<<20)
		if err != nil {
			log.Warn("last good version unreadable; skipped", "service", name, "error", err)
			continue
		}
		var f lastGoodFile
		if err := json.Unmarshal(b, &f); err != nil || f.Version != 1 {
			log.Warn("last good version unreadable; skipped", "service", name, "error", err)
			continue
		}
		in := Input{Exists: true, Def: watcher.KV{Value: f.Definition.Value, ModRevision: f.Definition.ModRevision, CreateRevision: f.CreateRevision}}
		if len(f.Members) > 0 {
			in.Members = make(map[string]watcher.KV, len(f.Members))
			for m, v := range f.Members {
				in.Members[m] = watcher.KV{Value: v.Value, ModRevision: v.ModRevision}
			}
		}
		out[name] = in
		l.onDisk[name] = signature(in)
	}
	return l, out, nil
}

// signature identifies an input by its revisions.
func signature(in Input) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d/%d", in.Def.CreateRevision, in.Def.ModRevision)
	for _, m := range sortedKeys(in.Members) {
		fmt.Fprintf(&b, " %s=%d", m, in.Members[m].ModRevision)
	}
	return b.String()
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// Save queues in as the last good version of name.
func (l *LastGood) Save(name string, in Input) {
	in.Members = maps.Clone(in.Members)
	l.enqueue(name, &in)
}

// Delete queues the removal of name's record.
func (l *LastGood) Delete(name string) { l.enqueue(name, nil) }

func (l *LastGood) enqueue(name string, in *Input) {
	l.mu.Lock()
	if !l.busy {
		l.idle, l.busy = make(chan struct{}), true
	}
	l.queue[name] = in
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// Flushed returns a channel closed once every queued write is done (for
// tests and for shutdown).
func (l *LastGood) Flushed() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.idle
}

// Start lets Run write. It may be called more than once.
func (l *LastGood) Start() { l.startOnce.Do(func() { close(l.start) }) }

// Run writes queued records, once Start was called, until ctx is done,
// then writes what is still queued and returns.
func (l *LastGood) Run(ctx context.Context) error {
	select {
	case <-l.start:
	case <-ctx.Done():
		l.flush()
		return ctx.Err()
	}
	for {
		select {
		case <-ctx.Done():
			l.flush()
			return ctx.Err()
		case <-l.wake:
			l.flush()
		}
	}
}

func (l *LastGood) flush() {
	for {
		l.mu.Lock()
		var name string
		var in *Input
		found := false
		for n, v := range l.queue {
			name, in, found = n, v, true
			break
		}
		if !found {
			if l.busy {
				close(l.idle)
				l.busy = false
			}
			l.mu.Unlock()
			return
		}
		delete(l.queue, name)
		done := l.onDisk[name]
		l.mu.Unlock()
		path := filepath.Join(l.dir, name+".json")
		if in == nil {
			if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				l.log.Warn("remove last good version", "service", name, "error", err)
			}
			l.mu.Lock()
			delete(l.onDisk, name)
			l.mu.Unlock()
			continue
		}
		sig := signature(*in)
		if sig == done {
			continue
		}
		f := lastGoodFile{Version: 1, CreateRevision: in.Def.CreateRevision, Definition: lastGoodValue{Value: in.Def.Value, ModRevision: in.Def.ModRevision}}
		if len(in.Members) > 0 {
			f.Members = make(map[string]lastGoodValue, len(in.Members))
			for m, kv := range in.Members {
				f.Members[m] = lastGoodValue{Value: kv.Value, ModRevision: kv.ModRevision}
			}
		}
		b, err := json.Marshal(f)
		if err == nil {
			err = atomicfile.Write(path, b, 0o600)
		}
		if err != nil {
			l.log.Warn("write last good version; it will not survive a restart", "service", name, "error", err)
			continue
		}
		l.mu.Lock()
		l.onDisk[name] = sig
		l.mu.Unlock()
	}
}
