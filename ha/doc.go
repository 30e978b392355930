// Package ha decides, per HA group, which switchman agent owns the group
// and so holds its addresses (the VIPs of the group's services and the
// group's floating addresses). Every agent programs every service into
// its own data plane; a takeover moves only addresses. etcd is the only
// arbiter: an agent owns a group when /switchman/owners/<group> holds its
// name under its own lease, and it gets there only through an etcd
// transaction. UDP heartbeats between agents make detection fast but never
// decide ownership alone.
//
// # Keys
//
//   - /switchman/owners/<group>: {"node":"lb1","since":"...","epoch":N},
//     under the owner's lease (TTL --ha-lease-ttl, default 3s). Epoch is
//     one more than the etcd revision the claim was based on (and than the
//     previous owner's epoch), so it grows with every change of owner.
//   - /switchman/members/<node>: {"node":"lb1","addr":"10.0.0.1:7947"},
//     under the same lease: the live agents and where their heartbeats go.
//     This is ha's own liveness key; /switchman/nodes/<node> lives under
//     the status lease, whose TTL is not ha's to choose.
//   - /switchman/groups/<group>: optional settings (spec.ParseGroup).
//
// # How an agent works (defaults with the 3s lease)
//
// Every Round (100 ms) each agent reads the three prefixes in one
// linearizable request, even while the one before is still unanswered
// (at most two in flight), so one slow answer does not hold the next
// confirmation back; every TTL/6 (500 ms) it also renews its lease
// with KeepAliveOnce. Every Heartbeat (100 ms), and at once on any
// change, it sends each member a heartbeat: whether its last read
// succeeded within 2 Rounds ("etcd ok"), the peers it hears, the state of
// each group whose key it has (hold, wait, lost), and the groups it just
// released.
//
// The hold rule. An owner holds a group's addresses only while
//
//	now < confirmed + Hold   and   now < renewed + TTL - Margin
//
// where confirmed is the time the owner SENT the latest read (or write)
// that etcd answered with "the key is yours", and renewed the send time
// of the latest renewal etcd confirmed. Both count from the client's
// send, never from the server's answer: whatever the server did, it did
// after the request was sent. Hold is 400 ms, Margin 100 ms. The one
// exception is keep mode, below.
//
// Claims. A free group (no owner key) is claimed with a transaction that
// creates the key only if it is absent. A claimer first makes sure no
// earlier owner can still hold the group: the earlier owner released it
// and said so (its heartbeat names the released epoch), or its lease is
// gone (it expired: the owner dropped before that by the hold rule), or
// else Hold + Margin have passed since the key was seen gone. No agent
// claims a group that a peer heard within Silence says it holds. Less
// preferred agents wait Stagger (100 ms) per rank, counted from when the
// group became free, so the preferred agent wins; etcd still decides.
// Preference is the group's nodes in order, or else rendezvous hashing of
// group and node over the live agents, so groups spread over agents that
// start together. An agent claims nothing in its first StartGrace
// (600 ms) nor in the Regain (2 s) after its first contact with etcd;
// after it regains etcd it also waits Regain before it claims a group
// from an owner that may keep the group on the strength of its "no etcd"
// heartbeats (keep mode, below), unless that owner released the group or
// cleared those heartbeats.
//
// Takeover (the fast path). A standby replaces the owner key (a
// transaction comparing the key's ModRevision) when the owner is gone:
// silent to it for Silence (300 ms) while its key was not rewritten for
// Silence, or heard saying "lost" for Hold. The new owner then waits
// Hold + Margin from the transaction's answer before it holds.
//
// # Why two agents never hold one group while etcd works
//
// Let the key change hands at etcd time T (takeover, release, expiry or
// someone's delete). Every read the old owner sends after T says "not
// yours", so its confirmed is before T and it drops by T + Hold (plus
// the time to act, within Margin). The new owner:
//   - after a takeover or an unexplained deletion holds from its own
//     answer + Hold + Margin, which is after T + Hold + Margin;
//   - after an expiry holds at once: the lease ran out no earlier than
//     renewed + TTL, and the old owner dropped by renewed + TTL - Margin;
//   - after a release holds once the old owner said it dropped.
//
// Process pauses and clock-rate differences are within Margin by
// assumption; the tests check the rule on a fake clock (sim_test.go),
// including a control with an owner whose Hold is too long, where the
// simulation does see two holders.
//
// # Keep mode: etcd down for everyone
//
// An owner whose hold deadline passed keeps its addresses (without ever
// starting to hold) while every other member was heard, within
// Regain - Margin and after the owner sent its last read that etcd
// answered or its last renewal that etcd confirmed (whichever is
// earlier), saying it has no etcd either. Those agents cannot claim;
// after regaining etcd each waits Regain before it claims from that
// owner, longer than the owner keeps on the strength of its last "no
// etcd" heartbeat. etcd itself helps: while it has no leader no lease
// expires, and a new leader renews them all. With no other member heard,
// an owner must assume it is the one cut off, and drops.
//
// Clearing. A "no etcd" heartbeat heard before both the owner's own last
// successful read and its last successful renewal says only that the
// peer's reads were slow or failed for a moment (a loaded host), not that
// etcd is gone for everyone: it does not count, and never will again
// (time, the last read and the last renewal only move on). An owner that
// hears such a report renews its lease with its next read to void it. Each heartbeat lists, per peer whose reports all no longer count,
// the last heartbeat heard from it ("cleared"). A peer cleared by the
// owner past its last "no etcd" heartbeat knows the owner cannot keep on
// its account and skips the Regain wait for that owner's groups; without
// that (the owner silent, heartbeats lost) it waits. So a lapse of a few
// hundred milliseconds under load no longer holds a takeover back for
// Regain.
//
// # Cases
//
//   - Owner isolated (no etcd, peers heard): peers say "etcd ok", so no
//     keep mode; the owner drops at confirmed + Hold and reports "lost";
//     after Hold of that a peer takes over and holds Hold + Margin later
//     (about 1.3 s). Heard by no one: the peers' fast path takes over after
//     Silence, holding after Hold + Margin (about 0.8 s).
//   - Standby isolated: it cannot write to etcd, so it claims nothing;
//     after it regains etcd it waits Regain, or until the owner clears
//     its "no etcd" heartbeats.
//   - etcd down for all: owners keep (keep mode), standbys cannot claim;
//     when etcd is back owners reconfirm, nothing moves. If an owner's
//     client takes longer than Regain - Margin to reconnect than its
//     peers', it drops and a peer may take over (safely).
//   - Owner SIGKILLed, or its host dead: heartbeats stop and the key is
//     not rewritten; after Silence a standby takes over and holds after
//     Hold + Margin (0.8 s), well within the TTL. A killed process on a
//     living host leaves its addresses in the kernel until the agent
//     restarts and its address holder removes what it does not own; the
//     new owner's announcements move the traffic meanwhile.
//   - Owner SIGTERM (Release): it deletes its keys first, then drops the
//     addresses, then tells its peers (heartbeat with the released epoch
//     and "leaving"), then revokes its lease; the preferred standby claims
//     at once. A few ms on a LAN.
//   - Partition between peers only: both reach etcd. An agent that does
//     not hear a peer, or hears it say it does not hear it, rewrites its
//     owner keys every Silence/3 ("touch"): the standby sees the key
//     change and does not take over. Should a takeover happen anyway
//     (asymmetric loss), the loser marks that peer suspect and never fast-
//     paths back until it hears it again, so nothing flaps.
//   - Key deleted by someone else: the owner sees it at its next read and
//     drops; the others wait Hold + Margin (the owner's lease is still
//     alive), or claim at once if the owner says it dropped.
//   - Two agents racing for one group: both send the create transaction;
//     etcd applies one, the other fails; the loser holds nothing.
//
// # Limits
//
// Keep mode trusts that every agent able to claim is a member the owner
// knew and heard; an agent that joins while the others are all cut off
// from etcd (but it is not) could claim while an owner keeps. UDP
// heartbeats are accepted only from members' registered addresses but are
// not authenticated. A foreign revocation of an owner's lease looks like
// an expiry; a peer that hears the owner still waits for it to stop
// saying "hold".
package ha
