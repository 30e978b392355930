package ipvs

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"slices"

	"github.com/switchman-lb/switchman/internal/atomicfile"
)

// StateFile is the name of the file, in the driver's data directory, that
// records the virtual services the driver created.
const StateFile = "ipvs-owned.json"

type ownedFile struct {
	Version  int            `json:"version"`
	Services []ownedService `json:"services"`
}

type ownedService struct {
	Name     string     `json:"name"`
	Protocol string     `json:"protocol"`
	Address  netip.Addr `json:"address"`
	Port     uint16     `json:"port"`
}

// loadOwned reads the state file; a missing file means nothing is owned.
func loadOwned(path string) (map[Key]string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[Key]string{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read IPVS ownership record: %w", err)
	}
	var f ownedFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("read IPVS ownership record %s: %w", path, err)
	}
	if f.Version != 1 {
		return nil, fmt.Errorf("read IPVS ownership record %s: version %d, want 1", path, f.Version)
	}
	out := make(map[Key]string, len(f.Services))
	for i, s := range f.Services {
		var p Protocol
		switch s.Protocol {
		case "tcp":
			p = TCP
		case "udp":
			p = UDP
		default:
			return nil, fmt.Errorf("read IPVS ownership record %s: services[%d].protocol: %q is not tcp or udp", path, i, s.Protocol)
		}
		if !s.Address.IsValid() {
			return nil, fmt.Errorf("read IPVS ownership record %s: services[%d].address is missing", path, i)
		}
		out[Key{Protocol: p, Address: s.Address.Unmap(), Port: s.Port}] = s.Name
	}
	return out, nil
}

// saveOwned writes the state file atomically (temporary file, fsync,
// rename), mode 0600.
func saveOwned(path string, owned map[Key]string) error {
	keys := make([]Key, 0, len(owned))
	for k := range owned {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, compareKeys)
	f := ownedFile{Version: 1, Services: make([]ownedService, 0, len(keys))}
	for _, k := range keys {
		f.Services = append(f.Services, ownedService{Name: owned[k], Protocol: k.Protocol.String(), Address: k.Address, Port: k.Port})
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("encode IPVS ownership record: %w", err)
	}
	if err := atomicfile.Write(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write IPVS ownership record: %w", err)
	}
	return nil
}
