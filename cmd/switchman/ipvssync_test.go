package main

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/switchman-lb/switchman/drivers/ipvs"
	"github.com/switchman-lb/switchman/status"
)

func TestIPVSSyncFlags(t *testing.T) {
	tests := []struct {
		args    []string
		want    *ipvs.SyncSettings
		wantErr string
	}{
		{args: nil, want: nil},
		{args: []string{"--ipvs-sync-interface", "eth2"}, want: &ipvs.SyncSettings{Interface: "eth2"}},
		{args: []string{"--ipvs-sync-interface", "eth2", "--ipvs-sync-id", "7", "--ipvs-sync-group", "239.1.2.3", "--ipvs-sync-port", "9000", "--ipvs-sync-ttl", "2"},
			want: &ipvs.SyncSettings{Interface: "eth2", SyncID: 7, Group: netip.MustParseAddr("239.1.2.3"), Port: 9000, TTL: 2}},
		{args: []string{"--ipvs-sync-interface", "eth2", "--ipvs-sync-group", "ff02::81"}, want: &ipvs.SyncSettings{Interface: "eth2", Group: netip.MustParseAddr("ff02::81")}},
		{args: []string{"--ipvs-sync-id", "7"}, wantErr: "--ipvs-sync-id is set but --ipvs-sync-interface is not"},
		{args: []string{"--ipvs-sync-interface", "eth2", "--ipvs-sync-id", "256"}, wantErr: "--ipvs-sync-id 256: want 0 to 255"},
		{args: []string{"--ipvs-sync-interface", "eth2", "--ipvs-sync-group", "10.0.0.1"}, wantErr: `--ipvs-sync-group "10.0.0.1": want a multicast address`},
		{args: []string{"--ipvs-sync-interface", "eth2", "--ipvs-sync-port", "0"}, wantErr: "--ipvs-sync-port 0: want 1 to 65535"},
		{args: []string{"--ipvs-sync-interface", "eth2", "--ipvs-sync-port", "70000"}, wantErr: "--ipvs-sync-port 70000"},
		{args: []string{"--ipvs-sync-interface", "eth2", "--ipvs-sync-ttl", "0"}, wantErr: "--ipvs-sync-ttl 0: want 1 to 255"},
		{args: []string{"--ipvs-sync-interface", "a-very-long-interface-name"}, wantErr: "a-very-long-interface-name"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			got, err := parseFlags(t, ipvsSyncFlags(), tt.args, syncFromFlags)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || (got == nil) != (tt.want == nil) || (got != nil && *got != *tt.want) {
				t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestSyncNodeAndRows(t *testing.T) {
	on := &ipvs.SyncSettings{Interface: "eth2", SyncID: 7}
	tests := []struct {
		name string
		st   ipvs.SyncStatus
		want *status.IPVSSync
	}{
		{"off", ipvs.SyncStatus{}, nil},
		{"both", ipvs.SyncStatus{Settings: on, Running: []ipvs.Role{ipvs.Master, ipvs.Backup}},
			&status.IPVSSync{Interface: "eth2", SyncID: 7, Running: []string{"master", "backup"}}},
		{"refused", ipvs.SyncStatus{Settings: on, Err: errors.New("mixed")}, &status.IPVSSync{Interface: "eth2", SyncID: 7, Running: []string{}, Error: "mixed"}},
		{"stop failed", ipvs.SyncStatus{Err: errors.New("cannot read")}, &status.IPVSSync{Running: []string{}, Error: "cannot read"}},
	}
	for _, tt := range tests {
		got := syncNode(tt.st)
		if (got == nil) != (tt.want == nil) || got != nil && (got.Interface != tt.want.Interface || got.SyncID != tt.want.SyncID ||
			!slices.Equal(got.Running, tt.want.Running) || got.Error != tt.want.Error) {
			t.Errorf("%s: %+v, want %+v", tt.name, got, tt.want)
		}
	}

	rows := syncRows(map[string]status.Node{
		"lb2":    {IPVSSync: &status.IPVSSync{Interface: "eth2", SyncID: 7, Running: []string{"master"}, Error: "start the IPVS backup sync daemon: no such device\nat all"}},
		"lb1":    {IPVSSync: &status.IPVSSync{Interface: "eth2", SyncID: 7, Running: []string{"master", "backup"}}},
		"lb3":    {IPVSSync: &status.IPVSSync{Running: []string{}, Error: "cannot read"}},
		"lb4":    {Groups: []string{"web"}},
		"lb\x1b": {IPVSSync: &status.IPVSSync{Interface: "e\x1b", Running: []string{}}},
	})
	want := []string{
		"\"lb\\x1b\"\tno daemon on \"e\\x1b\" (sync id 0)\t-",
		"lb1\tmaster+backup on eth2 (sync id 7)\t-",
		"lb2\tmaster on eth2 (sync id 7)\tstart the IPVS backup sync daemon: no such device at all",
		"lb3\toff\tcannot read",
	}
	if !slices.Equal(rows, want) {
		t.Fatalf("rows:\n%s\nwant:\n%s", strings.Join(rows, "\n"), strings.Join(want, "\n"))
	}
	if rows := syncRows(map[string]status.Node{"lb1": {}}); len(rows) != 0 {
		t.Errorf("rows without any sync: %v", rows)
	}
}
