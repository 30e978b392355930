package ipvs

import (
	"context"
	"fmt"
)

// Batcher is implemented by kernels that can send many writes at once.
type Batcher interface {
	// ApplyBatch sends ops in order and returns one error per op (nil when
	// the kernel accepted it), same length as ops. The context's deadline
	// bounds the whole batch: ops left unanswered when it passes fail with
	// context.DeadlineExceeded (they may or may not have taken effect).
	ApplyBatch(ctx context.Context, ops []Op) []error
}

var _ Batcher = (*Netlink)(nil)

// ApplyBatch sends ops over the raw generic-netlink socket, as many
// requests per sendmsg as the socket buffers take (each with NLM_F_ACK and
// its own sequence number), then reads the acknowledgements and maps each
// back to its op by sequence number. An op the kernel would refuse for its
// form (a bad address, a scheduler name too long) fails with EINVAL without
// being sent.
func (n *Netlink) ApplyBatch(ctx context.Context, ops []Op) []error {
	out := make([]error, len(ops))
	if len(ops) == 0 {
		return out
	}
	n.stats.batches.Add(1)
	ran := false
	err := n.genl.do(ctx, func(c *genlConn) error {
		ran = true
		w := msgWriter{b: make([]byte, 0, 160*len(ops))}
		b := batch{first: c.seq + 1, ends: make([]int, 0, len(ops))}
		sent := make([]int, 0, len(ops)) // op index of each request
		for i, op := range ops {
			if err := w.writeOp(c.family, b.first+uint32(len(sent)), op); err != nil {
				out[i] = err
				continue
			}
			sent = append(sent, i)
			b.ends = append(b.ends, len(w.b))
		}
		b.buf = w.b
		c.seq += uint32(len(sent))
		answers, fatal := c.exchange(ctx, &b)
		for k, i := range sent {
			out[i] = answers[k]
		}
		return fatal
	})
	if err != nil && !ran {
		// No socket (no IPVS, or no turn before ctx ended): nothing sent.
		for i := range out {
			out[i] = err
		}
	}
	for i, e := range out {
		if e != nil {
			out[i] = fmt.Errorf("%s: %w", describeOp(ops[i]), e)
		}
	}
	return out
}

// BatchStats returns what ApplyBatch has done so far.
func (n *Netlink) BatchStats() BatchStats { return n.stats.snapshot() }

// describeOp names a write as the single calls' errors do.
func describeOp(op Op) string {
	k := op.Service.Key().String()
	d := op.Destination.AddrPort().String()
	switch op.Kind {
	case AddService:
		return "add service " + k
	case UpdateService:
		return "update service " + k
	case DeleteService:
		return "delete service " + k
	case AddDestination:
		return "add destination " + d + " to " + k
	case UpdateDestination:
		return "update destination " + d + " of " + k
	case DeleteDestination:
		return "delete destination " + d + " of " + k
	}
	return op.Kind.String() + " " + k
}
