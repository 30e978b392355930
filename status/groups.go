package status

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/switchman-lb/switchman/spec"
)

// Group is one HA group as `switchman status` shows it: its owner (from
// /switchman/owners/<group>, empty when none), since when, and the live
// agents (/switchman/members/<node>) that may take it over.
type Group struct {
	Name     string
	Owner    string
	Since    time.Time
	Epoch    int64
	Standbys []string
	// Error says why the owner or settings value could not be read.
	Error string
}

// ReadGroups lists every HA group that has an owner or settings under
// prefix, with its owner and standbys, sorted by name, all at one etcd
// revision.
func ReadGroups(ctx context.Context, cli *clientv3.Client, prefix string) ([]Group, error) {
	prefix = strings.TrimSuffix(prefix, "/")
	owners, groups, members := prefix+"/owners/", prefix+"/groups/", prefix+"/members/"
	resp, err := cli.Txn(ctx).Then(
		clientv3.OpGet(owners, clientv3.WithPrefix()),
		clientv3.OpGet(groups, clientv3.WithPrefix()),
		clientv3.OpGet(members, clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		return nil, fmt.Errorf("read %s, %s and %s: %w", owners, groups, members, err)
	}
	out := map[string]*Group{}
	get := func(name string) *Group {
		if out[name] == nil {
			out[name] = &Group{Name: name}
		}
		return out[name]
	}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		g := get(strings.TrimPrefix(string(kv.Key), owners))
		var o struct {
			Node  string    `json:"node"`
			Since time.Time `json:"since"`
			Epoch int64     `json:"epoch"`
		}
		if err := json.Unmarshal(kv.Value, &o); err != nil {
			g.Error = fmt.Sprintf("owner value is not JSON: %v", err)
			continue
		}
		g.Owner, g.Since, g.Epoch = o.Node, o.Since, o.Epoch
	}
	var live []string
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		live = append(live, strings.TrimPrefix(string(kv.Key), members))
	}
	slices.Sort(live)
	eligible := map[string][]string{} // group -> its settings' nodes, when listed
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		g := get(strings.TrimPrefix(string(kv.Key), groups))
		st, err := spec.ParseGroup(g.Name, kv.Value)
		if err != nil {
			g.Error = fmt.Sprintf("settings: %v", err)
			continue
		}
		eligible[g.Name] = st.Nodes
	}
	list := make([]Group, 0, len(out))
	for _, name := range slices.Sorted(maps.Keys(out)) {
		g := out[name]
		for _, n := range live {
			if n != g.Owner && (len(eligible[name]) == 0 || slices.Contains(eligible[name], n)) {
				g.Standbys = append(g.Standbys, n)
			}
		}
		list = append(list, *g)
	}
	return list, nil
}
