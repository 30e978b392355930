package netfilter

import (
	"errors"
	"fmt"
	"os/exec"

	"github.com/coreos/go-iptables/iptables"
)

// ipTables runs Debian's iptables or ip6tables through go-iptables. It is
// the only file that imports go-iptables.
type ipTables struct {
	h   *iptables.IPTables
	bin string
}

// openIPTables opens the iptables (v6 false) or ip6tables binary. A missing
// binary gives an error that says what to install, wrapping
// exec.ErrNotFound.
func openIPTables(v6 bool) (Tables, error) {
	proto, bin := iptables.ProtocolIPv4, "iptables"
	if v6 {
		proto, bin = iptables.ProtocolIPv6, "ip6tables"
	}
	// Timeout: wait at most this many seconds for the xtables lock rather
	// than forever.
	h, err := iptables.New(iptables.IPFamily(proto), iptables.Timeout(30))
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return nil, fmt.Errorf("%s is not installed: install the iptables package (apt-get install iptables), which provides iptables and ip6tables: %w", bin, err)
		}
		return nil, fmt.Errorf("open %s: %w", bin, err)
	}
	return &ipTables{h: h, bin: bin}, nil
}

func (t *ipTables) NewChain(table, chain string) error {
	return t.wrap(t.h.NewChain(table, chain))
}

func (t *ipTables) ChainExists(table, chain string) (bool, error) {
	ok, err := t.h.ChainExists(table, chain)
	return ok, t.wrap(err)
}

func (t *ipTables) ListChains(table string) ([]string, error) {
	c, err := t.h.ListChains(table)
	return c, t.wrap(err)
}

func (t *ipTables) DeleteChain(table, chain string) error {
	return t.wrap(t.h.DeleteChain(table, chain))
}

func (t *ipTables) List(table, chain string) ([]string, error) {
	l, err := t.h.List(table, chain)
	return l, t.wrap(err)
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

func (t *ipTables) Exists(table, chain string, rule ...string) (bool, error) {
	ok, err := t.h.Exists(table, chain, rule...)
	return ok, t.wrap(err)
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
