// Package templates holds the text templates switchman renders, embedded in
// the binary. It exists because go:embed cannot reach a parent folder: the
// render package reads haproxy.cfg.tmpl through FS.
package templates

import "embed"

// FS holds haproxy.cfg.tmpl: the header, tcp service sections and the
// http frontends, no-route backend and backend slots.
//
//go:embed haproxy.cfg.tmpl
var FS embed.FS
