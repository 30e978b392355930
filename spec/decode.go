package spec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
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
	if err := singleDocument(data); err != nil {
		return Errors{fieldErr("", "%v", err)}
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	var generic any
	if err := dec.Decode(&generic); err != nil {
		return Errors{fieldErr("", "not valid JSON or YAML: %v", err)}
	}
	return assignDocument(generic, out)
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
// the same value would be silently ignored.
func singleDocument(data []byte) error {
	dec := yamlv2.NewDecoder(bytes.NewReader(data))
	for n := 0; ; n++ {
		var doc any
		err := dec.Decode(&doc)
		switch {
		case errors.Is(err, io.EOF):
			return nil
		case err != nil && n == 0:
			return fmt.Errorf("not valid JSON or YAML: %w", err)
		case err != nil:
			return fmt.Errorf("unexpected text after the definition: %w", err)
		case n > 0 && doc != nil:
			return errors.New("holds more than one document; a value is one definition")
		}
	}
}

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
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	dec.UseNumber()
	if err := noDuplicateKeys(dec); err != nil {
		return nil, true, err
	}
	dec = json.NewDecoder(bytes.NewReader(trimmed))
	dec.UseNumber()
	if err := dec.Decode(&generic); err != nil {
		return nil, false, nil
	}
	return generic, true, nil
}

// noDuplicateKeys walks one JSON value token by token and reports a key
// that appears twice in the same object.
func noDuplicateKeys(dec *json.Decoder) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	delim, ok := tok.(json.Delim)
	if !ok {
		return nil
	}
	switch delim {
	case '{':
		seen := map[string]bool{}
		for dec.More() {
			k, err := dec.Token()
			if err != nil {
				return err
			}
			key, _ := k.(string)
			if seen[key] {
				return fmt.Errorf("not valid JSON or YAML: key %q already set in map", key)
			}
			seen[key] = true
			if err := noDuplicateKeys(dec); err != nil {
				return err
			}
		}
	case '[':
		for dec.More() {
			if err := noDuplicateKeys(dec); err != nil {
				return err
			}
		}
	}
	_, err = dec.Token() // the closing delimiter
	return err
}
