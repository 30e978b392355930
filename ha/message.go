package ha

import (
	"encoding/json"
	"fmt"
	"time"
)

// Group states an agent reports in its heartbeats for the groups whose
// owner key it holds.
const (
	stateHold = "hold" // holding the group's addresses
	stateWait = "wait" // owner, waiting out an earlier owner's hold deadline
	stateLost = "lost" // owner key maybe still its own, but unconfirmed: not holding
)

// heartbeat is the UDP message agents send each other (JSON; small).
type heartbeat struct {
	V    int    `json:"v"`
	Node string `json:"node"`
	// Inc is a random number per process start; Seq grows within one.
	Inc uint64 `json:"inc"`
	Seq uint64 `json:"seq"`
	// Etcd says whether the sender's latest etcd read succeeded recently.
	Etcd bool `json:"etcd"`
	// Leaving says the sender is handing its groups over and stopping.
	Leaving bool `json:"leaving,omitempty"`
	// Hear lists the peers the sender has heard recently.
	Hear []string `json:"hear,omitempty"`
	// Groups maps each group whose owner key the sender holds to its state.
	Groups map[string]string `json:"groups,omitempty"`
	// Released maps groups the sender released and no longer holds to what
	// it released.
	Released map[string]releaseNote `json:"released,omitempty"`
	// Cleared maps peers that once said they had no etcd to the last of
	// their heartbeats the sender heard: none of their "no etcd" reports
	// up to it counts for the sender's keep mode any more, and none ever
	// will (the sender has read from etcd since it heard the latest).
	Cleared map[string]seqNote `json:"cleared,omitempty"`
}

// seqNote names one heartbeat of a peer: its incarnation and sequence
// number.
type seqNote struct {
	Inc uint64 `json:"inc"`
	Seq uint64 `json:"seq"`
}

// releaseNote says an owner deleted its key of epoch Epoch (at etcd
// revision Rev) and then dropped the group's addresses.
type releaseNote struct {
	Epoch int64 `json:"epoch"`
	Rev   int64 `json:"rev"`
}

const heartbeatVersion = 1

func decodeHeartbeat(b []byte) (heartbeat, error) {
	var h heartbeat
	if err := json.Unmarshal(b, &h); err != nil {
		return h, fmt.Errorf("decode heartbeat: %w", err)
	}
	if h.V != heartbeatVersion || h.Node == "" {
		return h, fmt.Errorf("heartbeat of version %d from %q: want version %d and a node", h.V, h.Node, heartbeatVersion)
	}
	return h, nil
}

// ownerValue is the value of /switchman/owners/<group>.
type ownerValue struct {
	Node  string    `json:"node"`
	Since time.Time `json:"since"`
	Epoch int64     `json:"epoch"`
}

// memberValue is the value of /switchman/members/<node>: how to reach the
// agent's heartbeats.
type memberValue struct {
	Node string `json:"node"`
	Addr string `json:"addr"`
}
