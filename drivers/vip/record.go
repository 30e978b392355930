package vip

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"slices"
	"strings"

	"github.com/switchman-lb/switchman/internal/atomicfile"
)

// RecordFile is the name of the file, in the driver's state directory,
// that lists the addresses the driver added and has not removed yet. It is
// written before an address is added and after one is removed, so after a
// crash or a restart the driver knows which addresses on a shared
// interface (lo, the HA interface, a floating address's interface) are its
// own: it removes those it no longer wants and never touches the others.
const RecordFile = "vip-owned.json"

// maxRecord bounds the record file read at start.
const maxRecord = 16 << 20

// slot is one address on one interface.
type slot struct {
	Iface string
	Addr  netip.Prefix
}

func (s slot) String() string { return s.Addr.String() + " on " + s.Iface }

func compareSlots(a, b slot) int {
	if c := strings.Compare(a.Iface, b.Iface); c != 0 {
		return c
	}
	if c := a.Addr.Addr().Compare(b.Addr.Addr()); c != 0 {
		return c
	}
	return a.Addr.Bits() - b.Addr.Bits()
}

type recordFile struct {
	Version   int           `json:"version"`
	Addresses []recordEntry `json:"addresses"`
}

type recordEntry struct {
	Interface string       `json:"interface"`
	Address   netip.Prefix `json:"address"`
}

// loadRecord reads the record; a missing file (or no path) means nothing
// was added.
func loadRecord(path string) (map[slot]bool, error) {
	out := map[slot]bool{}
	if path == "" {
		return out, nil
	}
	b, err := atomicfile.ReadBounded(path, maxRecord)
	if errors.Is(err, fs.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the VIP ownership record: %w", err)
	}
	var f recordFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("read the VIP ownership record %s: %w", path, err)
	}
	if f.Version != 1 {
		return nil, fmt.Errorf("read the VIP ownership record %s: version %d, want 1", path, f.Version)
	}
	for i, e := range f.Addresses {
		if !e.Address.IsValid() || !ifaceName(e.Interface) {
			return nil, fmt.Errorf("read the VIP ownership record %s: addresses[%d]: %q on %q is not an address on an interface", path, i, e.Address, e.Interface)
		}
		out[slot{Iface: e.Interface, Addr: e.Address}] = true
	}
	return out, nil
}

// encodeRecord returns the file's content for the slots in rec.
func encodeRecord(rec map[slot]bool) []byte {
	keys := make([]slot, 0, len(rec))
	for k := range rec {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, compareSlots)
	f := recordFile{Version: 1, Addresses: make([]recordEntry, len(keys))}
	for i, k := range keys {
		f.Addresses[i] = recordEntry{Interface: k.Iface, Address: k.Addr}
	}
	b, _ := json.MarshalIndent(f, "", "  ") // prefixes and strings always encode
	return append(b, '\n')
}

// ifaceName reports whether s can name a Linux interface.
func ifaceName(s string) bool {
	return s != "" && len(s) <= 15 && !strings.ContainsAny(s, "/ \t\n:") && s != "." && s != ".."
}
