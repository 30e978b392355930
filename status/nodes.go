package status

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// ReadNodes returns every live agent's node key under prefix, by node; a
// value that is not JSON comes back with only Version saying so.
func ReadNodes(ctx context.Context, cli *clientv3.Client, prefix string) (map[string]Node, error) {
	prefix = strings.TrimSuffix(prefix, "/") + "/nodes/"
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", prefix, err)
	}
	out := make(map[string]Node, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var n Node
		if err := json.Unmarshal(kv.Value, &n); err != nil {
			n = Node{Version: fmt.Sprintf("unreadable: %v", err)}
		}
		out[strings.TrimPrefix(string(kv.Key), prefix)] = n
	}
	return out, nil
}
