package lab

import (
	"flag"
	"strings"
	"testing"
	"time"
)

// Ms rounds d to the millisecond for a figure.
func Ms(d time.Duration) string { return d.Round(time.Millisecond).String() }

// RequireNamed skips a figures test unless -run names it (its name
// contains word): figures run only when asked for, as `make bench-*` do.
func RequireNamed(t *testing.T, word, how string) {
	t.Helper()
	if f := flag.Lookup("test.run"); f == nil || !strings.Contains(f.Value.String(), word) {
		t.Skipf("figures run only when named: %s", how)
	}
}
