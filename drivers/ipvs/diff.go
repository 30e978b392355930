package ipvs

import (
	"fmt"
	"slices"
)

// OpKind is the kind of one kernel write.
type OpKind int

// Kernel writes, in the order Diff emits them for one service.
const (
	AddService OpKind = iota
	UpdateService
	DeleteService
	AddDestination
	UpdateDestination
	DeleteDestination
)

// String names the write.
func (k OpKind) String() string {
	switch k {
	case AddService:
		return "add-service"
	case UpdateService:
		return "update-service"
	case DeleteService:
		return "delete-service"
	case AddDestination:
		return "add-destination"
	case UpdateDestination:
		return "update-destination"
	case DeleteDestination:
		return "delete-destination"
	}
	return fmt.Sprintf("op%d", int(k))
}

// Op is one kernel write.
type Op struct {
	Kind OpKind
	// Owner is the switchman service the write is for; it is empty when
	// removing a service no definition wants any more.
	Owner       string
	Service     Service
	Destination Destination // for the destination writes
}

// String describes the write for logs and test failures.
func (o Op) String() string {
	switch o.Kind {
	case AddDestination, UpdateDestination, DeleteDestination:
		return fmt.Sprintf("%s %s %s w=%d %s", o.Kind, o.Service.Key(), o.Destination.AddrPort(), o.Destination.Weight, o.Destination.Forwarding)
	}
	return fmt.Sprintf("%s %s %s flags=%#x timeout=%d", o.Kind, o.Service.Key(), o.Service.Scheduler, uint32(o.Service.Flags), o.Service.Timeout)
}

// Desired is one virtual service as switchman wants it.
type Desired struct {
	Name         string // the switchman service
	Service      Service
	Destinations []Destination
}

// Observed is one virtual service as the kernel has it. Destinations need
// only be filled for services that are both desired and owned.
type Observed struct {
	Service      Service
	Destinations []Destination
}

// ForeignServiceError reports a desired vip:port/protocol that the kernel
// already has from someone other than switchman. The driver leaves such a
// service alone.
type ForeignServiceError struct{ Key Key }

func (e *ForeignServiceError) Error() string {
	return fmt.Sprintf("%s exists in the kernel and was not created by switchman; remove it or pick another vip:port", e.Key)
}

// Diff returns the kernel writes that make the services this driver owns
// match desired, and the desired services it refuses to touch because the
// kernel has them from someone else. owned maps the keys this driver
// created to the switchman service that wanted them. Services neither
// desired nor owned are never written. Anything that can be updated in
// place is updated: a changed scheduler, flag or persistence is one
// UpdateService; a changed weight or forwarding method is one
// UpdateDestination. Deletions of services no longer wanted come first (a
// service moving to another vip:port is removed, then added).
func Diff(desired []Desired, actual map[Key]Observed, owned map[Key]string) (ops []Op, refused map[string]error) {
	refused = map[string]error{}
	want := make(map[Key]bool, len(desired))
	for _, d := range desired {
		want[d.Service.Key()] = true
	}
	var gone []Key
	for k := range owned {
		if _, present := actual[k]; present && !want[k] {
			gone = append(gone, k)
		}
	}
	slices.SortFunc(gone, compareKeys)
	for _, k := range gone {
		ops = append(ops, Op{Kind: DeleteService, Service: actual[k].Service})
	}
	for _, d := range desired {
		k := d.Service.Key()
		obs, present := actual[k]
		if !present {
			ops = append(ops, Op{Kind: AddService, Owner: d.Name, Service: d.Service})
			for _, dst := range d.Destinations {
				ops = append(ops, Op{Kind: AddDestination, Owner: d.Name, Service: d.Service, Destination: dst})
			}
			continue
		}
		if _, mine := owned[k]; !mine {
			refused[d.Name] = &ForeignServiceError{Key: k}
			continue
		}
		if obs.Service.Settings() != d.Service.Settings() {
			ops = append(ops, Op{Kind: UpdateService, Owner: d.Name, Service: d.Service})
		}
		ops = append(ops, diffDestinations(d, obs.Destinations)...)
	}
	return ops, refused
}

func diffDestinations(d Desired, have []Destination) []Op {
	cur := make(map[string]Destination, len(have))
	for _, h := range have {
		cur[h.AddrPort().String()] = h
	}
	var ops []Op
	seen := make(map[string]bool, len(d.Destinations))
	for _, w := range d.Destinations {
		ap := w.AddrPort().String()
		seen[ap] = true
		h, ok := cur[ap]
		switch {
		case !ok:
			ops = append(ops, Op{Kind: AddDestination, Owner: d.Name, Service: d.Service, Destination: w})
		case h.Weight != w.Weight || h.Forwarding != w.Forwarding:
			ops = append(ops, Op{Kind: UpdateDestination, Owner: d.Name, Service: d.Service, Destination: w})
		}
	}
	for _, h := range have {
		if !seen[h.AddrPort().String()] {
			ops = append(ops, Op{Kind: DeleteDestination, Owner: d.Name, Service: d.Service, Destination: h})
		}
	}
	return ops
}

func compareKeys(a, b Key) int {
	if c := a.Address.Compare(b.Address); c != 0 {
		return c
	}
	if a.Port != b.Port {
		return int(a.Port) - int(b.Port)
	}
	return int(a.Protocol) - int(b.Protocol)
}
