package netfilter

import (
	"bytes"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"

	"github.com/coreos/go-iptables/iptables"
)

// ipTables runs Debian's iptables or ip6tables through go-iptables. It is
// the only file that imports go-iptables.
type ipTables struct {
	h    *iptables.IPTables
	bin  string // iptables or ip6tables
	path string // its path, for ListTable
}

// lockWait is how many seconds to wait for the xtables lock rather than
// forever.
const lockWait = 30

// openIPTables opens the iptables (v6 false) or ip6tables binary. A missing
// binary gives an error that says what to install, wrapping
// exec.ErrNotFound.
func openIPTables(v6 bool) (Tables, error) {
	proto, bin := iptables.ProtocolIPv4, "iptables"
	if v6 {
		proto, bin = iptables.ProtocolIPv6, "ip6tables"
	}
	path, err := exec.LookPath(bin)
	if err == nil {
		var h *iptables.IPTables
		h, err = iptables.New(iptables.IPFamily(proto), iptables.Path(path), iptables.Timeout(lockWait))
		if err == nil {
			return &ipTables{h: h, bin: bin, path: path}, nil
		}
	}
	if errors.Is(err, exec.ErrNotFound) {
		return nil, fmt.Errorf("%s is not installed: install the iptables package (apt-get install iptables), which provides iptables and ip6tables: %w", bin, err)
	}
	return nil, fmt.Errorf("open %s: %w", bin, err)
}

// ListTable runs iptables -t TABLE -S itself: go-iptables lists one chain
// at a time (List) or only the chain names (ListChains), and a read per
// chain would cost one process per service on every Apply.
func (t *ipTables) ListTable(table string) ([]string, error) {
	cmd := exec.Command(t.path, "--wait", strconv.Itoa(lockWait), "-t", table, "-S")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s -t %s -S: %w: %s", t.bin, table, err, bytes.TrimSpace(stderr.Bytes()))
	}
	return strings.Split(string(out), "\n"), nil
}

func (t *ipTables) NewChain(table, chain string) error {
	return t.wrap(t.h.NewChain(table, chain))
}

func (t *ipTables) DeleteChain(table, chain string) error {
	return t.wrap(t.h.DeleteChain(table, chain))
}

func (t *ipTables) Append(table, chain string, rule ...string) error {
	return t.wrap(t.h.Append(table, chain, rule...))
}

func (t *ipTables) Insert(table, chain string, pos int, rule ...string) error {
	return t.wrap(t.h.Insert(table, chain, pos, rule...))
}

func (t *ipTables) Delete(table, chain string, rule ...string) error {
	return t.wrap(t.h.Delete(table, chain, rule...))
}

// wrap keeps go-iptables' error (an *iptables.Error: errors.As reaches it
// and its ExitStatus) and names the binary.
// go-iptables' message already holds the command line and iptables' stderr.
func (t *ipTables) wrap(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", t.bin, err)
}
