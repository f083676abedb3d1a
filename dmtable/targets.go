package dmtable

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Linear maps the target onto Dev starting at Offset.
//
// Table form: "<dev> <offset>", e.g. "254:0 2048".
type Linear struct {
	Dev    DevRef
	Offset Sectors
}

func parseLinear(args []string) (*Linear, error) {
	if len(args) != 2 {
		return nil, fmt.Errorf("linear: want <dev> <offset>, got %d fields", len(args))
	}
	d, err := ParseDevRef(args[0])
	if err != nil {
		return nil, fmt.Errorf("linear: %w", err)
	}
	off, err := parseSectors("offset", args[1])
	if err != nil {
		return nil, fmt.Errorf("linear: %w", err)
	}
	return &Linear{Dev: d, Offset: off}, nil
}

func (*Linear) Type() string        { return "linear" }
func (l *Linear) String() string    { return l.Dev.String() + " " + l.Offset.String() }
func (l *Linear) Payload() string   { return l.String() }
func (l *Linear) Devices() []DevRef { return []DevRef{l.Dev} }

func (l *Linear) MapDevices(f func(DevRef) DevRef) Params {
	c := *l
	c.Dev = f(l.Dev)
	return &c
}

func (l *Linear) Validate(length Sectors) error {
	if l.Dev.IsZero() {
		return fmt.Errorf("linear: no device")
	}
	if l.Offset+length < l.Offset {
		return fmt.Errorf("linear: offset %d + length %d overflows", l.Offset, length)
	}
	return nil
}

// Stripe is one leg of a striped target.
type Stripe struct {
	Dev    DevRef
	Offset Sectors
}

// Striped spreads the target over Stripes in chunks of ChunkSize sectors.
//
// Table form: "<#stripes> <chunk size> <dev> <offset>...", e.g.
// "2 128 254:0 0 254:16 0".
type Striped struct {
	ChunkSize Sectors
	Stripes   []Stripe
}

func parseStriped(args []string) (*Striped, error) {
	if len(args) < 2 {
		return nil, fmt.Errorf("striped: want <#stripes> <chunk size> <dev> <offset>...")
	}
	n, err := parseUint(args[0], 32)
	if err != nil {
		return nil, fmt.Errorf("striped: stripe count %q: %w", args[0], err)
	}
	chunk, err := parseSectors("chunk size", args[1])
	if err != nil {
		return nil, fmt.Errorf("striped: %w", err)
	}
	if uint64(len(args)-2) != 2*n {
		return nil, fmt.Errorf("striped: %d stripes need %d fields, got %d", n, 2*n, len(args)-2)
	}
	s := &Striped{ChunkSize: chunk, Stripes: make([]Stripe, n)}
	for i := range s.Stripes {
		d, err := ParseDevRef(args[2+2*i])
		if err != nil {
			return nil, fmt.Errorf("striped: stripe %d: %w", i, err)
		}
		off, err := parseSectors("offset", args[3+2*i])
		if err != nil {
			return nil, fmt.Errorf("striped: stripe %d: %w", i, err)
		}
		s.Stripes[i] = Stripe{Dev: d, Offset: off}
	}
	return s, nil
}

func (*Striped) Type() string { return "striped" }

func (s *Striped) String() string {
	var b strings.Builder
	b.WriteString(strconv.Itoa(len(s.Stripes)))
	b.WriteByte(' ')
	b.WriteString(s.ChunkSize.String())
	for _, st := range s.Stripes {
		b.WriteByte(' ')
		b.WriteString(st.Dev.String())
		b.WriteByte(' ')
		b.WriteString(st.Offset.String())
	}
	return b.String()
}

func (s *Striped) Payload() string { return s.String() }

func (s *Striped) Devices() []DevRef {
	out := make([]DevRef, len(s.Stripes))
	for i, st := range s.Stripes {
		out[i] = st.Dev
	}
	return out
}

func (s *Striped) MapDevices(f func(DevRef) DevRef) Params {
	c := &Striped{ChunkSize: s.ChunkSize, Stripes: make([]Stripe, len(s.Stripes))}
	for i, st := range s.Stripes {
		c.Stripes[i] = Stripe{Dev: f(st.Dev), Offset: st.Offset}
	}
	return c
}

func (s *Striped) Validate(length Sectors) error {
	if len(s.Stripes) == 0 {
		return fmt.Errorf("striped: no stripes")
	}
	if s.ChunkSize == 0 {
		return fmt.Errorf("striped: zero chunk size")
	}
	n := Sectors(len(s.Stripes))
	if length%n != 0 {
		return fmt.Errorf("striped: length %d is not divisible by %d stripes", length, n)
	}
	if (length/n)%s.ChunkSize != 0 {
		return fmt.Errorf("striped: stripe width %d is not divisible by chunk size %d", length/n, s.ChunkSize)
	}
	for i, st := range s.Stripes {
		if st.Dev.IsZero() {
			return fmt.Errorf("striped: stripe %d has no device", i)
		}
	}
	return nil
}

// Error fails every I/O. It takes no parameters.
type Error struct{}

func (*Error) Type() string                          { return "error" }
func (*Error) String() string                        { return "" }
func (*Error) Payload() string                       { return "" }
func (*Error) Devices() []DevRef                     { return nil }
func (*Error) MapDevices(func(DevRef) DevRef) Params { return &Error{} }
func (*Error) Validate(Sectors) error                { return nil }

// Zero reads zeros and discards writes. It takes no parameters.
type Zero struct{}

func (*Zero) Type() string                          { return "zero" }
func (*Zero) String() string                        { return "" }
func (*Zero) Payload() string                       { return "" }
func (*Zero) Devices() []DevRef                     { return nil }
func (*Zero) MapDevices(func(DevRef) DevRef) Params { return &Zero{} }
func (*Zero) Validate(Sectors) error                { return nil }

// Other is a target of a type this package does not model (thin,
// snapshot, raid, cache, ...). Its parameters round-trip verbatim.
//
// Devices and MapDevices treat every field of the form major:minor, and
// every field starting with "/dev/", as a device reference. That holds for
// every device-mapper target in the kernel tree today (device fields are
// the only ones of that shape), but it is a heuristic: callers that must
// be certain should refuse tables with Other targets.
type Other struct {
	TargetType string
	Args       []string
}

func parseOther(typ string, args []string) (*Other, error) {
	if typ == "" || len(typ) >= dmMaxTypeName {
		return nil, fmt.Errorf("target type %q: want 1 to %d characters", typ, dmMaxTypeName-1)
	}
	return &Other{TargetType: typ, Args: append([]string(nil), args...)}, nil
}

func (o *Other) Type() string { return o.TargetType }

// String prints the parameters with the keys of the targets known to
// carry them masked: dm-integrity's table shows its internal_hash,
// journal_crypt and journal_mac keys (name:algorithm:hexkey).
func (o *Other) String() string {
	args := slices.Clone(o.Args)
	for i, a := range args {
		name, rest, ok := strings.Cut(a, ":")
		if !ok || (name != "internal_hash" && name != "journal_crypt" && name != "journal_mac") {
			continue
		}
		if alg, key, ok := strings.Cut(rest, ":"); ok && key != "" {
			args[i] = name + ":" + alg + ":" + strings.Repeat("0", len(key))
		}
	}
	return strings.Join(args, " ")
}

// Payload prints the parameters as they are, keys included.
func (o *Other) Payload() string { return strings.Join(o.Args, " ") }

func isDevField(s string) bool {
	return looksLikeDevNum(s) || strings.HasPrefix(s, "/dev/")
}

func (o *Other) Devices() []DevRef {
	var out []DevRef
	for _, a := range o.Args {
		if isDevField(a) {
			if r, err := ParseDevRef(a); err == nil {
				out = append(out, r)
			}
		}
	}
	return out
}

func (o *Other) MapDevices(f func(DevRef) DevRef) Params {
	c := &Other{TargetType: o.TargetType, Args: append([]string(nil), o.Args...)}
	for i, a := range c.Args {
		if isDevField(a) {
			if r, err := ParseDevRef(a); err == nil {
				c.Args[i] = f(r).String()
			}
		}
	}
	return c
}

func (o *Other) Validate(Sectors) error {
	if o.TargetType == "" || len(o.TargetType) >= dmMaxTypeName {
		return fmt.Errorf("target type %q: want 1 to %d characters", o.TargetType, dmMaxTypeName-1)
	}
	for _, a := range o.Args {
		if a == "" || strings.ContainsAny(a, " \t\n\x00") {
			return fmt.Errorf("%s: parameter %q is empty or contains white space", o.TargetType, a)
		}
	}
	return nil
}
