package dmtable

import (
	"fmt"
	"strconv"
	"strings"
)

// TargetStatus is one line of a device's status (`dmsetup status`):
// "<start> <length> <type> <status params>".
type TargetStatus struct {
	Start  Sectors
	Length Sectors
	// TargetType is the target type name.
	TargetType string
	// Raw is the status parameters exactly as the kernel returned them.
	Raw string
	// Mirror is the parsed status of a mirror target, nil for other types.
	Mirror *MirrorStatus
}

// String prints the status line (no trailing space when Raw is empty).
func (s TargetStatus) String() string {
	l := s.Start.String() + " " + s.Length.String() + " " + s.TargetType
	if s.Raw != "" {
		l += " " + s.Raw
	}
	return l
}

// ParseStatus parses one status line as `dmsetup status` prints it.
// Mirror statuses are parsed into Mirror; linear, striped-free types that
// report nothing (linear, crypt, error, zero) must have empty parameters.
func ParseStatus(line string) (TargetStatus, error) {
	f := strings.Fields(line)
	if len(f) < 3 {
		return TargetStatus{}, fmt.Errorf("status line %q: want <start> <length> <type> [status]", line)
	}
	start, err := parseSectors("start", f[0])
	if err != nil {
		return TargetStatus{}, fmt.Errorf("status line: %w", err)
	}
	length, err := parseSectors("length", f[1])
	if err != nil {
		return TargetStatus{}, fmt.Errorf("status line: %w", err)
	}
	return newTargetStatus(start, length, f[2], strings.Join(f[3:], " "))
}

// newTargetStatus builds a TargetStatus from the parts the ioctl returns.
func newTargetStatus(start, length Sectors, typ, raw string) (TargetStatus, error) {
	s := TargetStatus{Start: start, Length: length, TargetType: typ, Raw: raw}
	switch typ {
	case "mirror":
		m, err := ParseMirrorStatus(raw)
		if err != nil {
			return s, fmt.Errorf("status of mirror target at %d: %w", start, err)
		}
		s.Mirror = &m
	case "linear", "crypt", "error", "zero":
		// These targets report no status on kernel 6.1 (dm-crypt's INFO
		// status is empty; linear, error and zero have none).
		if strings.TrimSpace(raw) != "" {
			return s, fmt.Errorf("status of %s target at %d: unexpected parameters %q", typ, start, raw)
		}
		s.Raw = ""
	}
	return s, nil
}

// MirrorLogStatus is the log part of a mirror status: "1 core" or
// "3 disk <dev> <health>".
type MirrorLogStatus struct {
	Type string
	// Args are the log status fields after the type (for a disk log: the
	// device and its health letter).
	Args []string
}

// MirrorStatus is the status of a mirror target, e.g.
//
//	2 254:0 253:3 12/32 1 AA 1 core
//
// (legs, in-sync/total regions, one health letter per leg, log status).
type MirrorStatus struct {
	Legs []DevRef
	// InSync and Regions are the regions in sync and the total.
	InSync, Regions uint64
	// Health has one letter per leg: A alive, D write failed, S sync
	// failed, R read failed, F flush failed, U unclassified.
	Health string
	Log    MirrorLogStatus
}

// Synced reports whether the mirror is completely and healthily in sync:
// every region in sync and every leg alive ('A'). Only then may a chunk be
// routed to the new leg.
func (m MirrorStatus) Synced() bool {
	if m.Regions == 0 || m.InSync != m.Regions || len(m.Health) != len(m.Legs) {
		return false
	}
	for i := 0; i < len(m.Health); i++ {
		if m.Health[i] != 'A' {
			return false
		}
	}
	return true
}

// Failed lists the legs whose health letter is not 'A'.
func (m MirrorStatus) Failed() []int {
	var out []int
	for i := 0; i < len(m.Health); i++ {
		if m.Health[i] != 'A' {
			out = append(out, i)
		}
	}
	return out
}

// String prints the status parameters as the kernel does.
func (m MirrorStatus) String() string {
	var b strings.Builder
	b.WriteString(strconv.Itoa(len(m.Legs)))
	for _, l := range m.Legs {
		b.WriteByte(' ')
		b.WriteString(l.String())
	}
	fmt.Fprintf(&b, " %d/%d 1 %s %d %s", m.InSync, m.Regions, m.Health, 1+len(m.Log.Args), m.Log.Type)
	for _, a := range m.Log.Args {
		b.WriteByte(' ')
		b.WriteString(a)
	}
	return b.String()
}

// ParseMirrorStatus parses the status parameters of a mirror target.
func ParseMirrorStatus(raw string) (MirrorStatus, error) {
	f := strings.Fields(raw)
	var m MirrorStatus
	if len(f) < 1 {
		return m, fmt.Errorf("empty mirror status")
	}
	n, err := parseUint(f[0], 32)
	if err != nil || n == 0 {
		return m, fmt.Errorf("mirror status: leg count %q", f[0])
	}
	f = f[1:]
	if uint64(len(f)) < n+3 {
		return m, fmt.Errorf("mirror status: too short for %d legs", n)
	}
	m.Legs = make([]DevRef, n)
	for i := range m.Legs {
		if m.Legs[i], err = ParseDevRef(f[i]); err != nil {
			return m, fmt.Errorf("mirror status: leg %d: %w", i, err)
		}
	}
	f = f[n:]
	a, b, ok := strings.Cut(f[0], "/")
	if !ok {
		return m, fmt.Errorf("mirror status: region count %q: want <in sync>/<total>", f[0])
	}
	if m.InSync, err = parseUint(a, 64); err != nil {
		return m, fmt.Errorf("mirror status: regions in sync %q: %w", a, err)
	}
	if m.Regions, err = parseUint(b, 64); err != nil {
		return m, fmt.Errorf("mirror status: region total %q: %w", b, err)
	}
	if m.InSync > m.Regions {
		return m, fmt.Errorf("mirror status: %d of %d regions in sync", m.InSync, m.Regions)
	}
	// The kernel always prints one health field holding one letter per leg.
	if f[1] != "1" {
		return m, fmt.Errorf("mirror status: health field count %q, want 1", f[1])
	}
	m.Health = f[2]
	if uint64(len(m.Health)) != n {
		return m, fmt.Errorf("mirror status: %d health letters for %d legs", len(m.Health), n)
	}
	for i := 0; i < len(m.Health); i++ {
		if !strings.ContainsRune("ADSRFU", rune(m.Health[i])) {
			return m, fmt.Errorf("mirror status: unknown health letter %q", m.Health[i])
		}
	}
	f = f[3:]
	if len(f) < 2 {
		return m, fmt.Errorf("mirror status: missing log status")
	}
	nl, err := parseUint(f[0], 32)
	if err != nil || nl == 0 {
		return m, fmt.Errorf("mirror status: log field count %q", f[0])
	}
	if uint64(len(f)-1) != nl {
		return m, fmt.Errorf("mirror status: %d log fields announced, %d given", nl, len(f)-1)
	}
	m.Log = MirrorLogStatus{Type: f[1], Args: append([]string(nil), f[2:]...)}
	return m, nil
}
