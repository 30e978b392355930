package status

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// manyBackends returns n backends, every third unhealthy with a health
// error, every seventh draining.
func manyBackends(n int) []BackendStatus {
	at := time.Date(2026, 11, 30, 8, 0, 0, 123456789, time.UTC)
	out := make([]BackendStatus, n)
	for i := range out {
		b := BackendStatus{Address: fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255), Port: 8080, Healthy: i%3 != 0, Weight: 1,
			Draining: i%7 == 0, LastTransition: &at}
		if !b.Healthy {
			b.LastError = fmt.Sprintf("dial tcp %s:8080: connect: connection refused", b.Address)
		}
		out[i] = b
	}
	return out
}

func decode(t testing.TB, v []byte) Status {
	t.Helper()
	var st Status
	if err := json.Unmarshal(v, &st); err != nil {
		t.Fatalf("encoded status is not JSON: %v\n%.300s", err, v)
	}
	return st
}

// TestEncodeBounds: a status over etcd's request limit (20,000 backends,
// an error text that JSON quoting amplifies six-fold) encodes under
// MaxValueSize, keeping the first backends and the counts of all.
func TestEncodeBounds(t *testing.T) {
	quoted := strings.Repeat("<\x01", 300_000) // each byte quotes as \u00XX
	tests := []struct {
		name       string
		st         Status
		wantListed int // -1: all
		wantError  string
	}{
		{"small status is unchanged", Status{State: StateApplied, Revision: 7, Driver: "ipvs", VIP: "192.0.2.10:80/tcp", Backends: manyBackends(3)}, -1, ""},
		{"no backends", Status{State: StateRejected, Error: "port: 70000 is out of range 1-65535"}, -1, "port: 70000 is out of range 1-65535"},
		{"19,999 backends", Status{State: StateApplied, Driver: "ipvs", Backends: manyBackends(19_999)}, MaxListedBackends, ""},
		{"amplified error text", Status{State: StateRejected, Error: quoted}, -1, quoted[:MaxErrorText] + fmt.Sprintf("... [%d more bytes cut]", len(quoted)-MaxErrorText)},
		{"both, and long backend errors", Status{State: StateFailed, Error: quoted, Backends: func() []BackendStatus {
			bs := manyBackends(MaxListedBackends)
			for i := range bs {
				bs[i].LastError = quoted
			}
			return bs
		}()}, 0, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v := Encode(tc.st)
			if len(v) > MaxValueSize {
				t.Fatalf("encoded status is %d bytes, over %d", len(v), MaxValueSize)
			}
			got := decode(t, v)
			healthy, total := got.Counts()
			wantHealthy, _ := Status{Backends: tc.st.Backends}.Counts()
			if total != len(tc.st.Backends) || healthy != wantHealthy {
				t.Errorf("counts %d/%d, want %d/%d", healthy, total, wantHealthy, len(tc.st.Backends))
			}
			switch {
			case tc.wantListed == -1:
				if got.Summary != nil || len(got.Backends) != len(tc.st.Backends) {
					t.Errorf("%d backends listed, summary %+v; want all %d and no summary", len(got.Backends), got.Summary, len(tc.st.Backends))
				}
			case tc.wantListed > 0 && len(got.Backends) != tc.wantListed:
				t.Errorf("%d backends listed, want %d", len(got.Backends), tc.wantListed)
			}
			if got.Summary != nil && got.Summary.Listed != len(got.Backends) {
				t.Errorf("summary says %d listed, %d are", got.Summary.Listed, len(got.Backends))
			}
			for i, b := range got.Backends {
				if b.Address != tc.st.Backends[i].Address {
					t.Fatalf("listed backend %d is %s, want %s (the first ones, in order)", i, b.Address, tc.st.Backends[i].Address)
				}
			}
			if tc.wantError != "" && got.Error != tc.wantError {
				t.Errorf("error text %.80q..., want %.80q...", got.Error, tc.wantError)
			}
			if tc.name == "small status is unchanged" {
				old, _ := json.Marshal(tc.st)
				if string(v) != string(old) {
					t.Errorf("a small status encodes differently from json.Marshal:\n%s\n%s", v, old)
				}
			}
		})
	}
}

// FuzzEncode: any status (any backends, any text) encodes under
// MaxValueSize into JSON that decodes back, with the counts of every
// backend and texts cut only with the marker.
func FuzzEncode(f *testing.F) {
	f.Add("applied", "ipvs", "", "192.0.2.10:80/tcp", uint16(2), "10.0.0.1", "", int64(0), uint8(3))
	f.Add("rejected", "", "port: 70000 is out of range", "", uint16(0), "", "", int64(0), uint8(0))
	f.Add("failed", "haproxy", strings.Repeat("\"<>&\x00\xff", 2000), "", uint16(19_999), "fe80::1", "dial: refused", int64(1<<62), uint8(1))
	f.Add("\xff\xfe", strings.Repeat("é", 300), "\u2028", "x", uint16(300), strings.Repeat("\x7f", 200), strings.Repeat("\\", 1000), int64(-1<<62), uint8(255))
	f.Fuzz(func(t *testing.T, state, driver, errText, vip string, n uint16, addr, lastErr string, unixNano int64, pattern uint8) {
		at := time.Unix(0, unixNano).AddDate(int(pattern)*40, 0, 0) // some years past 9999
		st := Status{State: state, Driver: driver, Error: errText, VIP: vip, Revision: unixNano, FailingOpen: pattern&1 == 1}
		// Up to 4 x MaxListedBackends: past MaxListedBackends only the
		// counts change (TestEncodeBounds has 19,999), and a smaller value
		// leaves the fuzzer time for the texts.
		n %= 4 * MaxListedBackends
		healthy, draining := 0, 0
		st.Backends = make([]BackendStatus, 0, n)
		for i := 0; i < int(n); i++ {
			b := BackendStatus{Address: addr, Port: uint16(i), Weight: i, Healthy: pattern>>(i%8)&1 == 1, Draining: i%3 == 0, LastError: lastErr}
			if i%2 == 0 {
				b.LastTransition = &at
			}
			if b.Healthy {
				healthy++
			}
			if b.Draining {
				draining++
			}
			st.Backends = append(st.Backends, b)
		}
		v := Encode(st)
		if len(v) > MaxValueSize {
			t.Fatalf("encoded status is %d bytes, over %d", len(v), MaxValueSize)
		}
		got := decode(t, v)
		h, total := got.Counts()
		if h != healthy || total != int(n) {
			t.Fatalf("counts %d/%d, want %d/%d", h, total, healthy, n)
		}
		if got.Summary != nil && (got.Summary.Draining != draining || got.Summary.Listed != len(got.Backends)) {
			t.Fatalf("summary %+v, want %d draining and %d listed", got.Summary, draining, len(got.Backends))
		}
		if got.Summary == nil && len(got.Backends) != int(n) {
			t.Fatalf("%d of %d backends listed without a summary", len(got.Backends), n)
		}
		for _, pair := range [][2]string{{got.State, state}, {got.Driver, driver}, {got.Error, errText}, {got.VIP, vip}} {
			checkCut(t, pair[0], pair[1])
		}
		for i, b := range got.Backends {
			if b.Port != uint16(i) {
				t.Fatalf("listed backend %d has port %d: not the first ones in order", i, b.Port)
			}
			checkCut(t, b.LastError, lastErr)
		}
	})
}

// checkCut fails unless got is in (valid UTF-8) or a prefix of it followed
// by the cut marker.
func checkCut(t *testing.T, got, in string) {
	t.Helper()
	valid := strings.ToValidUTF8(in, "\uFFFD")
	if got == valid {
		return
	}
	head, _, ok := strings.Cut(got, "... [")
	if !ok || !strings.HasPrefix(valid, head) || !strings.HasSuffix(got, " more bytes cut]") || !utf8.ValidString(got) {
		t.Fatalf("text %.100q is neither %.100q nor a prefix of it with the cut marker", got, valid)
	}
}
