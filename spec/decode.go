package spec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"regexp"
	"sort"
	"strings"

	yamlv2 "go.yaml.in/yaml/v2"
	"sigs.k8s.io/yaml"
)

// maxDefinitionSize bounds one definition value; etcd's own default request
// limit is 1.5 MiB, and no sane definition comes near this.
const maxDefinitionSize = 1 << 20

// decodeStrict turns a JSON or YAML document into out (a pointer to one of
// the raw structs below), rejecting unknown fields and values of the wrong
// type with errors that carry the full field path (backends[1].port).
func decodeStrict(data []byte, out any) Errors {
	if len(bytes.TrimSpace(data)) == 0 {
		return Errors{fieldErr("", "the definition is empty")}
	}
	if len(data) > maxDefinitionSize {
		return Errors{fieldErr("", "the definition is %d bytes, more than the limit of %d", len(data), maxDefinitionSize)}
	}
	if generic, ok, err := decodeJSON(data); ok {
		// JSON, the common case of `etcdctl put` and of machines, skips the
		// YAML parser, which costs several times more.
		if err != nil {
			return Errors{fieldErr("", "%v", err)}
		}
		return assignDocument(generic, out)
	}
	// Strict: a key given twice is an error, not a silent choice of one.
	js, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return Errors{fieldErr("", "not valid JSON or YAML: %v", err)}
	}
	doc, err := singleDocument(data)
	if err != nil {
		return Errors{fieldErr("", "%v", err)}
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	var generic any
	if err := dec.Decode(&generic); err != nil {
		return Errors{fieldErr("", "not valid JSON or YAML: %v", err)}
	}
	var numErrs Errors
	doc.checkNumbers("", &numErrs)
	if len(numErrs) == 0 {
		return assignDocument(generic, out)
	}
	// A number written ambiguously is reported once, by its own message.
	bad := map[string]bool{}
	for _, e := range numErrs {
		bad[e.Path] = true
	}
	for _, e := range assignDocument(generic, out) {
		if !bad[e.Path] {
			numErrs = append(numErrs, e)
		}
	}
	return numErrs
}

// assignDocument stores a decoded document into out.
func assignDocument(generic any, out any) Errors {
	if _, ok := generic.(map[string]any); !ok {
		return Errors{fieldErr("", "%s is not a mapping of fields", describe(generic))}
	}
	var errs Errors
	assign("", generic, reflect.ValueOf(out).Elem(), &errs)
	return errs
}

// singleDocument checks that nothing follows the first YAML document (or
// JSON value) but empty documents: YAMLToJSON reads the first one and drops
// the rest without a word, so a second definition or stray text pasted into
// the same value would be silently ignored. It returns the first document
// with each scalar's text as written.
func singleDocument(data []byte) (*yamlNode, error) {
	dec := yamlv2.NewDecoder(bytes.NewReader(data))
	first := &yamlNode{}
	for n := 0; ; n++ {
		var doc any
		var err error
		if n == 0 {
			err = dec.Decode(first)
		} else {
			err = dec.Decode(&doc)
		}
		switch {
		case errors.Is(err, io.EOF):
			return first, nil
		case err != nil && n == 0:
			return nil, fmt.Errorf("not valid JSON or YAML: %w", err)
		case err != nil:
			return nil, fmt.Errorf("unexpected text after the definition: %w", err)
		case n > 0 && doc != nil:
			return nil, errors.New("holds more than one document; a value is one definition")
		}
	}
}

// yamlNode is a YAML document read with each scalar's text as written
// beside the value YAML 1.1 resolves it to, so a number written in a form
// that YAML versions read differently can be refused instead of guessed.
type yamlNode struct {
	mapping map[string]*yamlNode
	list    []*yamlNode
	value   any    // a scalar's resolved value (or a node not walked further)
	text    string // a scalar's text
}

// UnmarshalYAML implements yamlv2.Unmarshaler.
func (n *yamlNode) UnmarshalYAML(unmarshal func(any) error) error {
	if err := unmarshal(&n.mapping); err == nil {
		return nil // a mapping, or null
	}
	n.mapping = nil
	if err := unmarshal(&n.list); err == nil {
		return nil
	}
	n.list = nil
	if err := unmarshal(&n.value); err != nil {
		return err
	}
	switch n.value.(type) {
	case map[any]any, []any:
		return nil // e.g. a mapping with keys that are not scalars
	}
	_ = unmarshal(&n.text) // a scalar always has its text
	return nil
}

// checkNumbers reports every plain scalar that YAML reads as an integer but
// that is not written in decimal digits as JSON writes it: 0120 is 80 in
// YAML 1.1 (octal) and 120 in YAML 1.2, 1_000 is a number in one and a
// string in the other, and 0x50, 0o120 or 0b1010000 for a port are more
// likely mistakes than intent.
func (n *yamlNode) checkNumbers(path string, errs *Errors) {
	switch {
	case n == nil:
	case n.mapping != nil:
		keys := make([]string, 0, len(n.mapping))
		for k := range n.mapping {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			n.mapping[k].checkNumbers(join(path, k), errs)
		}
	case n.list != nil:
		for i, item := range n.list {
			item.checkNumbers(fmt.Sprintf("%s[%d]", path, i), errs)
		}
	default:
		switch n.value.(type) {
		case int, int64, uint64:
			digits := strings.TrimPrefix(strings.TrimPrefix(n.text, "-"), "+")
			switch {
			case len(digits) > 1 && digits[0] == '0' && strings.Trim(digits, "0123456789") == "":
				errs.add(path, "%s has a leading zero, which YAML 1.1 reads as octal (%v) and YAML 1.2 as decimal; write the number without leading zeros", n.text, n.value)
			case !decimalRE.MatchString(n.text):
				errs.add(path, "%s is not a plain decimal number (YAML reads it as %v); write it in decimal digits", n.text, n.value)
			}
		case float64:
			digits := strings.TrimPrefix(strings.TrimPrefix(n.text, "-"), "+")
			if len(digits) > 1 && digits[0] == '0' && digits[1] >= '0' && digits[1] <= '9' {
				errs.add(path, "%s has a leading zero; write the number without leading zeros", n.text)
			}
		}
	}
}

// decimalRE is an integer as JSON writes it.
var decimalRE = regexp.MustCompile(`^-?(0|[1-9][0-9]*)$`)

// assign stores the generic JSON value v into dst, recording every problem.
func assign(path string, v any, dst reflect.Value, errs *Errors) {
	if v == nil {
		return // an explicit null leaves the default
	}
	switch dst.Kind() {
	case reflect.Pointer:
		elem := reflect.New(dst.Type().Elem())
		before := len(*errs)
		assign(path, v, elem.Elem(), errs)
		if len(*errs) == before {
			dst.Set(elem)
		}
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			errs.add(path, "%s is not a mapping of fields", describe(v))
			return
		}
		fields := structFields(dst.Type())
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			i, ok := fields[k]
			if !ok {
				errs.add(join(path, k), "unknown field (known: %s)", knownFields(fields))
				continue
			}
			assign(join(path, k), m[k], dst.Field(i), errs)
		}
	case reflect.Slice:
		list, ok := v.([]any)
		if !ok {
			errs.add(path, "%s is not a list", describe(v))
			return
		}
		out := reflect.MakeSlice(dst.Type(), len(list), len(list))
		for i, item := range list {
			assign(fmt.Sprintf("%s[%d]", path, i), item, out.Index(i), errs)
		}
		dst.Set(out)
	case reflect.String:
		s, ok := v.(string)
		if !ok {
			errs.add(path, "%s is not a string", describe(v))
			return
		}
		dst.SetString(s)
	case reflect.Bool:
		b, ok := v.(bool)
		if !ok {
			errs.add(path, "%s is not true or false", describe(v))
			return
		}
		dst.SetBool(b)
	case reflect.Int64:
		n, ok := v.(json.Number)
		if !ok {
			errs.add(path, "%s is not a number", describe(v))
			return
		}
		i, err := n.Int64()
		if err != nil {
			errs.add(path, "%s is not a whole number", n)
			return
		}
		dst.SetInt(i)
	default:
		panic("spec: raw type has an unsupported field kind " + dst.Kind().String())
	}
}

func structFields(t reflect.Type) map[string]int {
	fields := make(map[string]int, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		fields[name] = i
	}
	return fields
}

func knownFields(fields map[string]int) string {
	names := make([]string, 0, len(fields))
	for n := range fields {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

func join(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

// describe formats a generic JSON value for an error message.
func describe(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case string:
		return fmt.Sprintf("%q", x)
	case json.Number:
		return x.String()
	case map[string]any:
		return "a mapping"
	case []any:
		return "a list"
	default:
		return fmt.Sprint(x)
	}
}

// decodeJSON reads data as one JSON object when it looks like one, with the
// same strictness as the YAML path: a key given twice and anything after the
// object are errors. ok is false when data is not JSON; the caller then
// reads it as YAML (a superset), which also gives the error messages.
func decodeJSON(data []byte) (generic any, ok bool, err error) {
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 || trimmed[0] != '{' || !json.Valid(trimmed) {
		return nil, false, nil
	}
	generic, err = parseJSON(trimmed)
	return generic, true, err
}
