package spec

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
)

// Group is the settings of one HA group, the value of
// /switchman/groups/<group>. The zero value is the default: no floating
// addresses, any node may own the group, no preemption.
type Group struct {
	// Addresses are floating addresses that move with the group, each on
	// its own interface (e.g. the backends' gateway).
	Addresses []GroupAddress
	// Nodes are the agents that may own the group, most preferred first;
	// empty means any agent.
	Nodes []string
	// Preempt gives the group back to a more preferred node that is alive;
	// without it an owner keeps the group until it fails or hands over.
	Preempt bool
}

// GroupAddress is one floating address of a group and the interface that
// holds it.
type GroupAddress struct {
	Address   netip.Prefix
	Interface string
}

// Equal reports whether g and o are the same settings.
func (g Group) Equal(o Group) bool {
	return g.Preempt == o.Preempt && slices.Equal(g.Nodes, o.Nodes) && slices.Equal(g.Addresses, o.Addresses)
}

type rawGroup struct {
	Addresses []rawGroupAddress `json:"addresses"`
	Nodes     []string          `json:"nodes"`
	Preempt   *bool             `json:"preempt"`
}

type rawGroupAddress struct {
	Address   *string `json:"address"`
	Interface *string `json:"interface"`
}

// nodeRE is an agent's name (--node, by default the host name): letters,
// digits, '.', '_' and '-', as host names are; never a '/', which would
// split an etcd key.
var nodeRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$`)

// ValidateNode checks that name can name an agent in etcd keys.
func ValidateNode(name string) error {
	if !nodeRE.MatchString(name) {
		return fieldErr("node", "%q is not a node name (a host name: letters, digits, '.', '_' and '-', 1-253 characters)", name)
	}
	return nil
}

// ifaceRE is a Linux interface name: 1-15 bytes, no '/', ':' or white space.
var ifaceRE = regexp.MustCompile(`^[A-Za-z0-9_.@-]{1,15}$`)

// ParseGroup reads the settings of the HA group name (JSON or YAML),
// strictly: unknown fields, a bad address or interface name, a node that
// is not a DNS label or is listed twice, and an address given twice are
// errors naming the field and the value. The error is of type Errors.
func ParseGroup(name string, data []byte) (Group, error) {
	var errs Errors
	if !nameRE.MatchString(name) {
		errs.add("name", "%q is not a DNS label (lower-case letters, digits and '-', 1-63 characters)", name)
	}
	var raw rawGroup
	errs = append(errs, decodeStrict(data, &raw)...)
	if len(errs) > 0 {
		return Group{}, errs
	}
	var g Group
	seen := map[netip.Addr]string{}
	for i, a := range raw.Addresses {
		path := fmt.Sprintf("addresses[%d]", i)
		if a.Address == nil {
			errs.add(path+".address", "is required (an address with its prefix length, e.g. 10.1.0.1/24)")
		}
		if a.Interface == nil {
			errs.add(path+".interface", "is required (the interface that holds the address, e.g. eth1)")
		} else if !ifaceRE.MatchString(*a.Interface) || *a.Interface == "." || *a.Interface == ".." {
			errs.add(path+".interface", "%q is not an interface name (1-15 letters, digits, '_', '.', '@' or '-')", *a.Interface)
		}
		if a.Address == nil || a.Interface == nil {
			continue
		}
		p, err := netip.ParsePrefix(*a.Address)
		switch {
		case err != nil:
			errs.add(path+".address", "%q is not an address with a prefix length (e.g. 10.1.0.1/24 or 2001:db8::1/64)", *a.Address)
			continue
		case p.Addr().Zone() != "":
			errs.add(path+".address", "%q has a zone; give the interface in interface", *a.Address)
			continue
		case !p.Addr().IsGlobalUnicast() && !p.Addr().IsPrivate():
			errs.add(path+".address", "%q is not a unicast address a host can hold", *a.Address)
			continue
		}
		if prev, dup := seen[p.Addr()]; dup {
			errs.add(path+".address", "%q is already given in %s", *a.Address, prev)
			continue
		}
		seen[p.Addr()] = path
		g.Addresses = append(g.Addresses, GroupAddress{Address: p, Interface: *a.Interface})
	}
	for i, n := range raw.Nodes {
		path := fmt.Sprintf("nodes[%d]", i)
		switch {
		case !nodeRE.MatchString(n):
			errs.add(path, "%q is not a node name (a host name: letters, digits, '.', '_' and '-', 1-253 characters)", n)
		case slices.Contains(g.Nodes, n):
			errs.add(path, "%q is listed twice", n)
		default:
			g.Nodes = append(g.Nodes, n)
		}
	}
	if raw.Preempt != nil {
		g.Preempt = *raw.Preempt
	}
	if len(errs) > 0 {
		return Group{}, errs
	}
	return g, nil
}
