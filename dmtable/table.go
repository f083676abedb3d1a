package dmtable

import (
	"errors"
	"fmt"
	"strings"
)

// Params is the type-specific part of a target: everything after
// "<start> <length> <type>". Every implementation parses and prints itself
// in the kernel's own format.
//
// The concrete types are *Linear, *Striped, *Crypt, *Mirror, *Error,
// *Zero and *Other (any other target type, kept verbatim).
type Params interface {
	// Type is the target type name, e.g. "linear".
	Type() string
	// String prints the parameters as the kernel prints them in a table,
	// with secrets masked (see Key).
	String() string
	// Payload prints the parameters for the kernel, secrets included. Only
	// the Client should call it.
	Payload() string
	// Devices lists the device references, in table order.
	Devices() []DevRef
	// MapDevices returns a copy whose device references are f(ref).
	MapDevices(f func(DevRef) DevRef) Params
	// Validate checks the parameters against rules the kernel enforces,
	// given the target's length.
	Validate(length Sectors) error
}

// Target is one line of a table: Length sectors from Start of the mapped
// device, mapped as Params say.
type Target struct {
	Start  Sectors
	Length Sectors
	Params Params
}

// Type is the target type name ("" when Params is nil).
func (t Target) Type() string {
	if t.Params == nil {
		return ""
	}
	return t.Params.Type()
}

// End is Start+Length.
func (t Target) End() Sectors { return t.Start + t.Length }

// String prints the line as `dmsetup table` prints it (keys masked), with no
// trailing space when there are no parameters.
func (t Target) String() string { return t.line(false) }

// Payload prints the line with secrets included. Only the Client should
// call it; tests use it to check round trips.
func (t Target) Payload() string { return t.line(true) }

func (t Target) line(secrets bool) string {
	var p string
	if t.Params != nil {
		if secrets {
			p = t.Params.Payload()
		} else {
			p = t.Params.String()
		}
	}
	s := t.Start.String() + " " + t.Length.String() + " " + t.Type()
	if p != "" {
		s += " " + p
	}
	return s
}

// Equal reports whether t and o map the same range the same way, comparing
// their kernel payloads (keys in constant time).
func (t Target) Equal(o Target) bool {
	if t.Start != o.Start || t.Length != o.Length || t.Type() != o.Type() {
		return false
	}
	if t.Params == nil || o.Params == nil {
		return t.Params == nil && o.Params == nil
	}
	if a, ok := t.Params.(*Crypt); ok {
		if b, ok := o.Params.(*Crypt); ok {
			return a.Equal(b)
		}
		return false
	}
	return t.Params.Payload() == o.Params.Payload()
}

// Parse parses one table line, "<start> <length> <type> <params...>", as
// `dmsetup table` prints it (with --showkeys for real crypt keys).
func Parse(line string) (Target, error) {
	f := strings.Fields(line)
	if len(f) < 3 {
		return Target{}, fmt.Errorf("table line %q: want <start> <length> <type> [params]", redactLine(line))
	}
	start, err := parseSectors("start", f[0])
	if err != nil {
		return Target{}, fmt.Errorf("table line: %w", err)
	}
	length, err := parseSectors("length", f[1])
	if err != nil {
		return Target{}, fmt.Errorf("table line: %w", err)
	}
	p, err := ParseParams(f[2], f[3:])
	if err != nil {
		return Target{}, fmt.Errorf("table line %s %s %s: %w", f[0], f[1], f[2], err)
	}
	return Target{Start: start, Length: length, Params: p}, nil
}

// ParseParams parses the parameters of a target of type typ, given as
// white-space separated fields.
func ParseParams(typ string, args []string) (Params, error) {
	switch typ {
	case "linear":
		return parseLinear(args)
	case "striped":
		return parseStriped(args)
	case "crypt":
		return parseCrypt(args)
	case "mirror":
		return parseMirror(args)
	case "error":
		if len(args) != 0 {
			return nil, fmt.Errorf("error target takes no parameters")
		}
		return &Error{}, nil
	case "zero":
		if len(args) != 0 {
			return nil, fmt.Errorf("zero target takes no parameters")
		}
		return &Zero{}, nil
	default:
		return parseOther(typ, args)
	}
}

// redactLine keeps only the first three fields of a line for error
// messages: the parameters of a crypt line carry a key.
func redactLine(line string) string {
	f := strings.Fields(line)
	if len(f) > 3 {
		f = append(f[:3], "...")
	}
	return strings.Join(f, " ")
}

// Table is a device's mapping: its targets in order.
type Table []Target

// ParseTable parses a table as `dmsetup table` prints it, one target per
// line. Empty lines are ignored.
func ParseTable(text string) (Table, error) {
	var t Table
	for i, line := range strings.Split(text, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		tg, err := Parse(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", i+1, err)
		}
		t = append(t, tg)
	}
	return t, nil
}

// String prints the table, one target per line, keys masked.
func (t Table) String() string {
	var b strings.Builder
	for i, tg := range t {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(tg.String())
	}
	return b.String()
}

// Payload prints the table with secrets, one target per line. Only the
// Client and tests should call it.
func (t Table) Payload() string {
	var b strings.Builder
	for i, tg := range t {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(tg.Payload())
	}
	return b.String()
}

// Size is the mapped device's size: the end of the last target.
func (t Table) Size() Sectors {
	if len(t) == 0 {
		return 0
	}
	return t[len(t)-1].End()
}

// Validate checks what the kernel checks when a table is loaded, as far as
// a model can without the devices: the first target starts at 0, targets
// are contiguous and do not overlap, no length is zero or overflows, and
// every target's parameters are valid for its length.
func (t Table) Validate() error {
	if len(t) == 0 {
		return errors.New("table has no targets")
	}
	var next Sectors
	for i, tg := range t {
		if tg.Params == nil {
			return fmt.Errorf("target %d (start %d): no parameters", i, tg.Start)
		}
		if tg.Length == 0 {
			return fmt.Errorf("target %d (start %d, %s): zero length", i, tg.Start, tg.Type())
		}
		if tg.Start != next {
			if tg.Start < next {
				return fmt.Errorf("target %d (start %d, %s) overlaps the previous target, which ends at %d", i, tg.Start, tg.Type(), next)
			}
			return fmt.Errorf("target %d (start %d, %s) leaves a gap after %d", i, tg.Start, tg.Type(), next)
		}
		if tg.End() < tg.Start {
			return fmt.Errorf("target %d (start %d, %s): length %d overflows", i, tg.Start, tg.Type(), tg.Length)
		}
		if err := tg.Params.Validate(tg.Length); err != nil {
			return fmt.Errorf("target %d (start %d, %s): %w", i, tg.Start, tg.Type(), err)
		}
		next = tg.End()
	}
	return nil
}

// Equal reports whether t and o are equivalent: the same targets with the
// same parameters once both are printed in the kernel's canonical form
// (so option order and default options do not matter; keys compared in
// constant time).
func (t Table) Equal(o Table) bool {
	if len(t) != len(o) {
		return false
	}
	for i := range t {
		if !t[i].Equal(o[i]) {
			return false
		}
	}
	return true
}

// Devices lists the distinct device references of the table, in order of
// first appearance.
func (t Table) Devices() []DevRef {
	var out []DevRef
	for _, tg := range t {
		if tg.Params == nil {
			continue
		}
	next:
		for _, d := range tg.Params.Devices() {
			for _, e := range out {
				if e.Same(d) {
					continue next
				}
			}
			out = append(out, d)
		}
	}
	return out
}

// References reports whether any target names d (in the same form).
func (t Table) References(d DevRef) bool {
	for _, e := range t.Devices() {
		if e.Same(d) {
			return true
		}
	}
	return false
}

// ReplaceDevice returns a copy of t in which every reference to from is a
// reference to to, with the number of references replaced. Offsets are
// kept: this restacks a device onto another that maps the same sectors at
// the same offsets (an identity mapping such as the intermediate device).
// Targets of unknown types are rewritten through *Other's heuristic (see
// Other.Devices).
func (t Table) ReplaceDevice(from, to DevRef) (Table, int) {
	n := 0
	out := make(Table, len(t))
	for i, tg := range t {
		out[i] = tg
		if tg.Params == nil {
			continue
		}
		out[i].Params = tg.Params.MapDevices(func(r DevRef) DevRef {
			if r.Same(from) {
				n++
				return to
			}
			return r
		})
	}
	return out, n
}

// Clone returns a copy of t whose targets' parameters are copies too (key
// material is shared, see Key).
func (t Table) Clone() Table {
	out := make(Table, len(t))
	for i, tg := range t {
		out[i] = tg
		if tg.Params != nil {
			out[i].Params = tg.Params.MapDevices(func(r DevRef) DevRef { return r })
		}
	}
	return out
}
