package spec

import (
	"encoding/json"
	"fmt"
	"unicode/utf8"
)

// parseJSON reads one JSON value that json.Valid accepted into the generic
// form a json.Decoder with UseNumber gives (map[string]any, []any, string,
// json.Number, bool, nil), in one pass, and reports a key given twice in
// the same object. It replaces a token walk for duplicates followed by a
// second, reflective decode, which cost most of a definition's parse.
func parseJSON(data []byte) (any, error) {
	p := jsonParser{data: data}
	v, err := p.value()
	if err != nil {
		return nil, err
	}
	p.space()
	if p.i != len(p.data) {
		return nil, fmt.Errorf("not valid JSON or YAML: data after the value at byte %d", p.i)
	}
	return v, nil
}

// jsonParser walks input known to be valid JSON; it checks only what
// json.Valid does not (duplicate keys) and guards against running off the
// end all the same.
type jsonParser struct {
	data []byte
	i    int
}

var errTruncated = fmt.Errorf("not valid JSON or YAML: unexpected end")

func (p *jsonParser) space() {
	for p.i < len(p.data) {
		switch p.data[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

func (p *jsonParser) value() (any, error) {
	p.space()
	if p.i >= len(p.data) {
		return nil, errTruncated
	}
	switch c := p.data[p.i]; {
	case c == '{':
		return p.object()
	case c == '[':
		return p.array()
	case c == '"':
		return p.str()
	case c == 't':
		p.i += len("true")
		return true, nil
	case c == 'f':
		p.i += len("false")
		return false, nil
	case c == 'n':
		p.i += len("null")
		return nil, nil
	default:
		start := p.i
		for p.i < len(p.data) && isNumberByte(p.data[p.i]) {
			p.i++
		}
		if p.i == start {
			return nil, fmt.Errorf("not valid JSON or YAML: unexpected %q at byte %d", c, start)
		}
		return json.Number(p.data[start:p.i]), nil
	}
}

func isNumberByte(c byte) bool {
	return c >= '0' && c <= '9' || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E'
}

func (p *jsonParser) object() (any, error) {
	p.i++ // {
	m := map[string]any{}
	for {
		p.space()
		if p.i >= len(p.data) {
			return nil, errTruncated
		}
		switch p.data[p.i] {
		case '}':
			p.i++
			return m, nil
		case ',':
			p.i++
			continue
		}
		k, err := p.str()
		if err != nil {
			return nil, err
		}
		if _, dup := m[k]; dup {
			return nil, fmt.Errorf("not valid JSON or YAML: key %q already set in map", k)
		}
		p.space()
		if p.i >= len(p.data) || p.data[p.i] != ':' {
			return nil, errTruncated
		}
		p.i++
		v, err := p.value()
		if err != nil {
			return nil, err
		}
		m[k] = v
	}
}

func (p *jsonParser) array() (any, error) {
	p.i++ // [
	a := []any{}
	for {
		p.space()
		if p.i >= len(p.data) {
			return nil, errTruncated
		}
		switch p.data[p.i] {
		case ']':
			p.i++
			return a, nil
		case ',':
			p.i++
			continue
		}
		v, err := p.value()
		if err != nil {
			return nil, err
		}
		a = append(a, v)
	}
}

// str reads a string; one with escapes or bytes that are not UTF-8 is
// decoded by encoding/json, so the result is the same to the byte.
func (p *jsonParser) str() (string, error) {
	p.space()
	if p.i >= len(p.data) || p.data[p.i] != '"' {
		return "", errTruncated
	}
	start := p.i
	p.i++
	plain := true
	for p.i < len(p.data) {
		switch c := p.data[p.i]; {
		case c == '"':
			p.i++
			raw := p.data[start+1 : p.i-1]
			if plain && utf8.Valid(raw) {
				return string(raw), nil
			}
			var s string
			if err := json.Unmarshal(p.data[start:p.i], &s); err != nil {
				return "", fmt.Errorf("not valid JSON or YAML: %w", err)
			}
			return s, nil
		case c == '\\':
			plain = false
			p.i += 2
		default:
			p.i++
		}
	}
	return "", errTruncated
}
