package dmtable

import (
	"fmt"
	"strconv"
	"strings"
)

// SectorSize is the unit of every offset and length in a device-mapper
// table: 512 bytes, whatever the logical block size of the devices.
const SectorSize = 512

// Sectors is a count of 512-byte sectors. Bytes and sectors never mix: use
// SectorsFromBytes and Bytes to cross over.
type Sectors uint64

// SectorsFromBytes converts a byte count to sectors. It refuses a count
// that is not a multiple of 512.
func SectorsFromBytes(n uint64) (Sectors, error) {
	if n%SectorSize != 0 {
		return 0, fmt.Errorf("%d bytes is not a whole number of %d-byte sectors", n, SectorSize)
	}
	return Sectors(n / SectorSize), nil
}

// Bytes is the size in bytes. It panics if the result overflows uint64
// (more than 2^55 sectors, i.e. 16 EiB), which no block device reaches.
func (s Sectors) Bytes() uint64 {
	if s > Sectors(^uint64(0)/SectorSize) {
		panic(fmt.Sprintf("dmtable: %d sectors overflow a byte count", uint64(s)))
	}
	return uint64(s) * SectorSize
}

// String prints the decimal count, as tables do.
func (s Sectors) String() string { return strconv.FormatUint(uint64(s), 10) }

func parseSectors(field, s string) (Sectors, error) {
	v, err := parseUint(s, 64)
	if err != nil {
		return 0, fmt.Errorf("%s %q: %w", field, s, err)
	}
	return Sectors(v), nil
}

// parseUint accepts only plain decimal digits (no sign, no prefix, no
// leading zeros except "0" itself), so that formatting a parsed number
// always gives back the same text.
func parseUint(s string, bits int) (uint64, error) {
	if s == "" {
		return 0, fmt.Errorf("empty number")
	}
	if len(s) > 1 && s[0] == '0' {
		return 0, fmt.Errorf("leading zero in number")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("not a decimal number")
		}
	}
	v, err := strconv.ParseUint(s, 10, bits)
	if err != nil {
		return 0, fmt.Errorf("out of range")
	}
	return v, nil
}

// Dev is a block device number.
type Dev struct {
	Major, Minor uint32
}

// String prints "major:minor", e.g. "254:0", the form the kernel prints in
// tables.
func (d Dev) String() string {
	return strconv.FormatUint(uint64(d.Major), 10) + ":" + strconv.FormatUint(uint64(d.Minor), 10)
}

// IsZero reports whether d is 0:0, which names no device.
func (d Dev) IsZero() bool { return d == Dev{} }

// Ref is d as a table device reference.
func (d Dev) Ref() DevRef { return DevRef{Num: d} }

// ParseDev parses "major:minor".
func ParseDev(s string) (Dev, error) {
	maj, min, ok := strings.Cut(s, ":")
	if !ok {
		return Dev{}, fmt.Errorf("device number %q: want major:minor", s)
	}
	a, err := parseUint(maj, 32)
	if err != nil {
		return Dev{}, fmt.Errorf("device number %q: major: %w", s, err)
	}
	b, err := parseUint(min, 32)
	if err != nil {
		return Dev{}, fmt.Errorf("device number %q: minor: %w", s, err)
	}
	return Dev{Major: uint32(a), Minor: uint32(b)}, nil
}

// encode is the kernel's huge_encode_dev (new_encode_dev) form used in
// struct dm_ioctl.dev and the list/deps answers: minor low byte in bits
// 0-7, major in bits 8-19, the rest of the minor from bit 20 up.
func (d Dev) encode() uint64 {
	maj, min := uint64(d.Major), uint64(d.Minor)
	return (min & 0xff) | (maj << 8) | ((min &^ 0xff) << 12)
}

// decodeDev is the inverse of encode (the kernel's new_decode_dev).
func decodeDev(v uint64) Dev {
	maj := (v & 0xfff00) >> 8
	min := (v & 0xff) | ((v >> 12) & 0xfff00)
	return Dev{Major: uint32(maj), Minor: uint32(min)}
}

// DevRef is a device as a table names it: either a device number
// ("254:0", what the kernel always prints) or a path ("/dev/vda", which the
// kernel accepts on load). It round-trips either form. The zero value is
// the number 0:0, which names no device.
type DevRef struct {
	// Num is the device number when Path is empty.
	Num Dev
	// Path is the path form; when set, Num is ignored.
	Path string
}

// PathRef is a reference by path.
func PathRef(p string) DevRef { return DevRef{Path: p} }

// String prints the reference as it appears in a table.
func (r DevRef) String() string {
	if r.Path != "" {
		return r.Path
	}
	return r.Num.String()
}

// IsPath reports whether r is a path reference.
func (r DevRef) IsPath() bool { return r.Path != "" }

// Dev returns the device number and true for a number reference.
func (r DevRef) Dev() (Dev, bool) {
	if r.Path != "" {
		return Dev{}, false
	}
	return r.Num, true
}

// IsZero reports whether r names nothing (number 0:0, no path).
func (r DevRef) IsZero() bool { return r.Path == "" && r.Num.IsZero() }

// Same reports whether r and o are the same reference in the same form.
// A path and a number are never the same here: resolving a path needs the
// file system, which the model does not touch.
func (r DevRef) Same(o DevRef) bool {
	if r.Path != "" || o.Path != "" {
		return r.Path == o.Path
	}
	return r.Num == o.Num
}

// ParseDevRef parses a device reference: "major:minor" when it has that
// shape, otherwise a path (any non-empty token without white space).
func ParseDevRef(s string) (DevRef, error) {
	if s == "" {
		return DevRef{}, fmt.Errorf("empty device reference")
	}
	if strings.ContainsAny(s, " \t\n\x00") {
		return DevRef{}, fmt.Errorf("device reference %q contains white space", s)
	}
	if looksLikeDevNum(s) {
		d, err := ParseDev(s)
		if err != nil {
			return DevRef{}, err
		}
		return d.Ref(), nil
	}
	return DevRef{Path: s}, nil
}

// looksLikeDevNum reports whether s is digits ':' digits.
func looksLikeDevNum(s string) bool {
	maj, min, ok := strings.Cut(s, ":")
	return ok && isDigits(maj) && isDigits(min)
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
