package spec

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// decodeOracle is what parseJSON must give: encoding/json's generic decode
// with UseNumber, and whether some object has a key twice (walked token
// by token).
func decodeOracle(t *testing.T, data []byte) (v any, dup bool) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("oracle decode of valid JSON %q: %v", data, err)
	}
	tokens := json.NewDecoder(bytes.NewReader(data))
	tokens.UseNumber()
	var walk func() bool
	walk = func() bool {
		tok, err := tokens.Token()
		if err != nil {
			t.Fatalf("oracle token walk of %q: %v", data, err)
		}
		switch tok {
		case json.Delim('{'):
			seen := map[string]bool{}
			for tokens.More() {
				k, _ := tokens.Token()
				key, _ := k.(string)
				if seen[key] || walk() {
					return true
				}
				seen[key] = true
			}
			tokens.Token()
		case json.Delim('['):
			for tokens.More() {
				if walk() {
					return true
				}
			}
			tokens.Token()
		}
		return false
	}
	return v, walk()
}

func checkParseJSON(t *testing.T, data []byte) {
	if !json.Valid(data) {
		return
	}
	want, dup := decodeOracle(t, data)
	got, err := parseJSON(data)
	switch {
	case dup && err == nil:
		t.Fatalf("parseJSON(%q): no error, want a duplicate key", data)
	case dup && !strings.Contains(err.Error(), "already set in map"):
		t.Fatalf("parseJSON(%q): %v, want a duplicate key error", data, err)
	case !dup && err != nil:
		t.Fatalf("parseJSON(%q): %v", data, err)
	case !dup && !reflect.DeepEqual(got, want):
		t.Fatalf("parseJSON(%q) = %#v, want %#v", data, got, want)
	}
}

func TestParseJSON(t *testing.T) {
	for _, s := range []string{
		`{}`, `[]`, `"x"`, `0`, `-1.5e+10`, `true`, `false`, `null`,
		` { "a" : [ 1 , { "b" : null } , "c" ] , "d" : true } `,
		`{"vip":"192.0.2.10","port":80,"backends":[{"address":"10.0.0.1","port":8080,"weight":2}]}`,
		`{"a":"\u00e9\n\"\\/","b":"\ud83d\ude00"}`,
		"{\"a\":\"\xff\xfe\"}", // not UTF-8: replaced as encoding/json does
		`{"a":1,"a":2}`,
		`{"a":{"b":1,"b":1}}`,
		`[{"x":1},{"x":1}]`,
		`{"a":1,"A":2}`,
	} {
		t.Run(s, func(t *testing.T) { checkParseJSON(t, []byte(s)) })
	}
}

// FuzzParseJSON checks parseJSON against encoding/json on valid JSON.
func FuzzParseJSON(f *testing.F) {
	for _, s := range []string{`{"a":[1,2,{"b":"c"}]}`, `{"a":1,"a":2}`, `"\u0041"`, `[true,false,null,-0.5E3]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) { checkParseJSON(t, data) })
}
