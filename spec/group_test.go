package spec

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestParseGroup(t *testing.T) {
	good := []struct {
		name, doc string
		want      Group
	}{
		{name: "empty mapping is the default", doc: `{}`, want: Group{}},
		{name: "full", doc: `{"addresses":[{"address":"10.1.0.1/24","interface":"eth1"},{"address":"2001:db8::1/64","interface":"eth1.10"}],"nodes":["lb1","lb2.example.com"],"preempt":true}`,
			want: Group{Addresses: []GroupAddress{
				{Address: netip.MustParsePrefix("10.1.0.1/24"), Interface: "eth1"},
				{Address: netip.MustParsePrefix("2001:db8::1/64"), Interface: "eth1.10"}},
				Nodes: []string{"lb1", "lb2.example.com"}, Preempt: true}},
		{name: "yaml", doc: "nodes: [lb2, lb1]\npreempt: false\n", want: Group{Nodes: []string{"lb2", "lb1"}}},
		{name: "null keeps the default", doc: `{"preempt":null}`, want: Group{}},
	}
	for _, tc := range good {
		t.Run(tc.name, func(t *testing.T) {
			g, err := ParseGroup("web", []byte(tc.doc))
			if err != nil {
				t.Fatal(err)
			}
			if !g.Equal(tc.want) {
				t.Fatalf("got %+v, want %+v", g, tc.want)
			}
		})
	}

	bad := []struct {
		name, group, doc, path string
		msg                    []string
	}{
		{name: "group name", group: "Web_1", doc: `{}`, path: "name", msg: []string{`"Web_1"`}},
		{name: "unknown field", doc: `{"prempt":true}`, path: "prempt", msg: []string{"unknown field"}},
		{name: "preempt not bool", doc: `{"preempt":"yes"}`, path: "preempt", msg: []string{`"yes"`}},
		{name: "address without prefix", doc: `{"addresses":[{"address":"10.1.0.1","interface":"eth1"}]}`, path: "addresses[0].address", msg: []string{`"10.1.0.1"`, "prefix length"}},
		{name: "address missing", doc: `{"addresses":[{"interface":"eth1"}]}`, path: "addresses[0].address", msg: []string{"required"}},
		{name: "interface missing", doc: `{"addresses":[{"address":"10.1.0.1/24"}]}`, path: "addresses[0].interface", msg: []string{"required"}},
		{name: "interface too long", doc: `{"addresses":[{"address":"10.1.0.1/24","interface":"a-very-long-interface"}]}`, path: "addresses[0].interface", msg: []string{`"a-very-long-interface"`}},
		{name: "interface with slash", doc: `{"addresses":[{"address":"10.1.0.1/24","interface":"eth/1"}]}`, path: "addresses[0].interface", msg: []string{`"eth/1"`}},
		{name: "multicast address", doc: `{"addresses":[{"address":"224.0.0.1/24","interface":"eth1"}]}`, path: "addresses[0].address", msg: []string{`"224.0.0.1/24"`, "unicast"}},
		{name: "address twice", doc: `{"addresses":[{"address":"10.1.0.1/24","interface":"eth1"},{"address":"10.1.0.1/16","interface":"eth2"}]}`, path: "addresses[1].address", msg: []string{`"10.1.0.1/16"`, "addresses[0]"}},
		{name: "node with slash", doc: `{"nodes":["lb/1"]}`, path: "nodes[0]", msg: []string{`"lb/1"`}},
		{name: "node twice", doc: `{"nodes":["lb1","lb1"]}`, path: "nodes[1]", msg: []string{`"lb1"`, "twice"}},
		{name: "not a mapping", doc: `[1,2]`, path: "", msg: []string{"not a mapping"}},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			name := tc.group
			if name == "" {
				name = "web"
			}
			_, err := ParseGroup(name, []byte(tc.doc))
			var errs Errors
			if !errors.As(err, &errs) {
				t.Fatalf("error %v is not Errors", err)
			}
			for _, fe := range errs {
				if fe.Path != tc.path {
					continue
				}
				for _, m := range tc.msg {
					if !strings.Contains(fe.Msg, m) {
						t.Fatalf("%s: %q lacks %q", fe.Path, fe.Msg, m)
					}
				}
				return
			}
			t.Fatalf("no error at %q in %v", tc.path, err)
		})
	}
}

func TestValidateNode(t *testing.T) {
	for _, n := range []string{"lb1", "lb1.example.com", "LB_2"} {
		if err := ValidateNode(n); err != nil {
			t.Errorf("%q: %v", n, err)
		}
	}
	for _, n := range []string{"", "lb/1", "lb 1", "-lb"} {
		if err := ValidateNode(n); err == nil {
			t.Errorf("%q accepted", n)
		}
	}
}
