package lab

import (
	"flag"
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

// Percentile is the nearest-rank percentile p (0-100) of ds; 0 for none.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

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
