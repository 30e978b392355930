package main

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/ha"
	"github.com/switchman-lb/switchman/spec"
	"github.com/switchman-lb/switchman/status"
)

func TestHAFlags(t *testing.T) {
	addrs := map[string][]netip.Prefix{
		"eth1": {netip.MustParsePrefix("192.0.2.10/32"), netip.MustParsePrefix("fe80::1/64"), netip.MustParsePrefix("10.20.0.11/24")},
		"vips": {netip.MustParsePrefix("192.0.2.10/32"), netip.MustParsePrefix("fe80::1/64")},
	}
	addrsOf := func(iface string) ([]netip.Prefix, error) {
		if a, ok := addrs[iface]; ok {
			return a, nil
		}
		return nil, errors.New("no such network interface")
	}
	tests := []struct {
		args    []string
		want    haConfig
		wantErr string
	}{
		{args: nil, want: haConfig{LeaseTTL: 3 * time.Second, Round: 100 * time.Millisecond, Lifetime: 3 * time.Second}},
		{args: []string{"--ha-interface", "eth1"},
			want: haConfig{Interface: "eth1", LeaseTTL: 3 * time.Second, Round: 100 * time.Millisecond, Listen: "10.20.0.11:7947", Lifetime: 3 * time.Second}},
		{args: []string{"--ha-interface", "eth1", "--ha-lease-ttl", "5s", "--ha-round", "250ms", "--ha-address-lifetime", "0", "--ha-listen", "10.30.0.1:9000", "--ha-advertise", "198.51.100.1:9000"},
			want: haConfig{Interface: "eth1", LeaseTTL: 5 * time.Second, Round: 250 * time.Millisecond, Listen: "10.30.0.1:9000", Advertise: "198.51.100.1:9000"}},
		{args: []string{"--ha-interface", "eth1", "--ha-round", "300ms"}, wantErr: "--ha-lease-ttl 3s is too short for --ha-round 300ms"},
		{args: []string{"--ha-interface", "eth1", "--ha-round", "1ms"}, wantErr: "--ha-round 1ms is below 10ms"},
		{args: []string{"--ha-round", "200ms"}, wantErr: "--ha-round is set but --ha-interface is not"},
		{args: []string{"--ha-interface", "eth1", "--ha-lease-ttl", "1s"}, wantErr: "--ha-lease-ttl 1s is below etcd's minimum"},
		{args: []string{"--ha-interface", "eth1", "--ha-address-lifetime", "500ms"}, wantErr: "--ha-address-lifetime 500ms"},
		{args: []string{"--ha-interface", "vips"}, wantErr: "--ha-interface vips has no address"},
		{args: []string{"--ha-interface", "eth9"}, wantErr: "--ha-interface eth9: no such network interface"},
		{args: []string{"--ha-interface", "eth1", "--ha-listen", "nonsense"}, wantErr: `--ha-listen "nonsense"`},
		{args: []string{"--ha-listen", "10.0.0.1:7947"}, wantErr: "--ha-listen is set but --ha-interface is not"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			got, err := parseFlags(t, haFlags(), tt.args, func(c *cli.Context) (haConfig, error) { return haFromFlags(c, addrsOf) })
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

type recordingHolder struct{ calls []string }

func (r *recordingHolder) Hold(group string, held bool, _ []spec.GroupAddress) {
	r.calls = append(r.calls, group+map[bool]string{true: "+", false: "-"}[held])
}

// TestHeldGroupsPublishes: every ownership change reaches the holder; the
// node key hears of the set of held groups only when it changes.
func TestHeldGroupsPublishes(t *testing.T) {
	rec := &recordingHolder{}
	var published [][]string
	h := &heldGroups{holder: rec, publish: func(g []string) { published = append(published, g) }, held: map[string]bool{}}
	h.Hold("web", true, nil)
	h.Hold("db", true, nil)
	h.Hold("web", true, nil) // floating addresses changed
	h.Hold("web", false, nil)
	if want := []string{"web+", "db+", "web+", "web-"}; !slices.Equal(rec.calls, want) {
		t.Errorf("holder calls %v, want %v", rec.calls, want)
	}
	want := [][]string{{"web"}, {"db", "web"}, {"db"}}
	if len(published) != len(want) {
		t.Fatalf("published %v, want %v", published, want)
	}
	for i := range want {
		if !slices.Equal(published[i], want[i]) {
			t.Errorf("publish %d: %v, want %v", i, published[i], want[i])
		}
	}
}

func TestGroupRows(t *testing.T) {
	now := time.Date(2026, 11, 30, 9, 0, 0, 0, time.UTC)
	rows := groupRows([]status.Group{
		{Name: "db", Standbys: []string{"lb1", "lb2"}},
		{Name: "web", Owner: "lb1", Since: now.Add(-90 * time.Second), Epoch: 3, Standbys: []string{"lb2"}},
		{Name: "x", Owner: "lb2", Since: now.Add(-time.Hour), Error: "settings: nodes[0]: \"A B\" is not a node name"},
		{Name: "y", Owner: "lb\x1b[31m", Since: now, Standbys: []string{"lb\n1"}},
	}, now)
	want := []string{
		"db\t-\t-\tlb1,lb2",
		"web\tlb1\t2026-11-30T08:58:30Z (1m30s ago)\tlb2",
		"x\tlb2\t2026-11-30T08:00:00Z (1h0m0s ago)\t-  (settings: nodes[0]: \"A B\" is not a node name)",
		"y\t\"lb\\x1b[31m\"\t2026-11-30T09:00:00Z (0s ago)\t\"lb\\n1\"",
	}
	if !slices.Equal(rows, want) {
		t.Fatalf("rows:\n%s\nwant:\n%s", strings.Join(rows, "\n"), strings.Join(want, "\n"))
	}
}

// TestTimingScales: every HA timing keeps its ratio to the round, and the
// scaled timing passes ha's own checks with the smallest TTL allowed.
func TestTimingScales(t *testing.T) {
	def := ha.DefaultTiming()
	if got := (haConfig{Round: def.Round}).timing(); got != def {
		t.Errorf("default round: %+v, want %+v", got, def)
	}
	for _, r := range []time.Duration{50 * time.Millisecond, 300 * time.Millisecond, time.Second} {
		tm := (haConfig{Round: r}).timing()
		f := float64(r) / float64(def.Round)
		for name, pair := range map[string][2]time.Duration{"hold": {tm.Hold, def.Hold}, "margin": {tm.Margin, def.Margin}, "silence": {tm.Silence, def.Silence},
			"regain": {tm.Regain, def.Regain}, "start grace": {tm.StartGrace, def.StartGrace}, "tick": {tm.Tick, def.Tick}, "heartbeat": {tm.Heartbeat, def.Heartbeat}} {
			if want := time.Duration(float64(pair[1]) * f); pair[0] != want {
				t.Errorf("round %v: %s %v, want %v", r, name, pair[0], want)
			}
		}
		ttl := max(12*r, 2*time.Second)
		if _, err := ha.New(ha.Options{Node: "lb1", Listen: "127.0.0.1:0", LeaseTTL: ttl, Timing: tm, Store: nopStore{}, Holder: &recordingHolder{}}); err != nil {
			t.Errorf("round %v with TTL %v: %v", r, ttl, err)
		}
	}
}

// nopStore is an ha.Store that is never called (the elector is not run).
type nopStore struct{ ha.Store }

// parseFlags runs args through an app with flags and returns what parse
// makes of them.
func parseFlags[T any](t *testing.T, flags []cli.Flag, args []string, parse func(*cli.Context) (T, error)) (T, error) {
	t.Helper()
	var got T
	var err error
	app := &cli.App{Flags: flags, Action: func(c *cli.Context) error {
		got, err = parse(c)
		return nil
	}}
	if runErr := app.Run(append([]string{"switchman"}, args...)); runErr != nil {
		t.Fatal(runErr)
	}
	return got, err
}
