package spec

import (
	"fmt"
	"strings"
)

// FieldError is one problem with a definition: the field path
// (backends[1].port) and a message that quotes the offending value.
type FieldError struct {
	Path string
	Msg  string
}

// Error formats the error as "path: message".
func (e *FieldError) Error() string {
	if e.Path == "" {
		return e.Msg
	}
	return e.Path + ": " + e.Msg
}

// Errors is every problem found in one definition, in field order.
type Errors []*FieldError

// Error joins the problems with "; ".
func (e Errors) Error() string {
	msgs := make([]string, len(e))
	for i, fe := range e {
		msgs[i] = fe.Error()
	}
	return strings.Join(msgs, "; ")
}

// Err returns e as an error, or nil when there is no problem.
func (e Errors) Err() error {
	if len(e) == 0 {
		return nil
	}
	return e
}

func (e *Errors) add(path, format string, args ...any) {
	*e = append(*e, fieldErr(path, format, args...))
}

func fieldErr(path, format string, args ...any) *FieldError {
	return &FieldError{Path: path, Msg: fmt.Sprintf(format, args...)}
}
