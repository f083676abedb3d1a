package lvm

import (
	"encoding/json"
	"fmt"
	"strconv"

	"github.com/dmconvert/dmconvert/dmtable"
)

// lvm's JSON report (--reportformat json): a list of report objects, each
// holding one or more sub-reports ("pv", "vg", "lv", "seg", "pvseg"; a
// fullreport has all five per VG) whose rows map field names to string
// values. With --units s --nosuffix every size is a decimal count of
// 512-byte sectors; with --binary every flag is "0" or "1".
type rawReport struct {
	Report []map[string][]map[string]string `json:"report"`
}

func parseReport(out []byte) (*rawReport, error) {
	var r rawReport
	if err := json.Unmarshal(out, &r); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadReport, err)
	}
	return &r, nil
}

// rows returns every row of the named sub-report across all report objects.
func (r *rawReport) rows(kind string) []map[string]string {
	var out []map[string]string
	for _, obj := range r.Report {
		out = append(out, obj[kind]...)
	}
	return out
}

// fieldReader converts the string fields of one row, remembering the
// first problem so that a conversion reads as a list of assignments.
type fieldReader struct {
	kind string
	row  map[string]string
	err  error
}

func (f *fieldReader) fail(field, format string, args ...any) {
	if f.err == nil {
		f.err = fmt.Errorf("%w: %s field %s: %s", ErrBadReport, f.kind, field, fmt.Sprintf(format, args...))
	}
}

func (f *fieldReader) str(field string) string {
	v, ok := f.row[field]
	if !ok {
		f.fail(field, "missing")
	}
	return v
}

func (f *fieldReader) u64(field string) uint64 {
	s := f.str(field)
	if s == "" {
		// lvm prints an empty value for a number it cannot know (e.g. the
		// sizes of a missing PV); callers treat 0 as "unknown".
		return 0
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		f.fail(field, "%q is not a count", s)
	}
	return v
}

func (f *fieldReader) sectors(field string) dmtable.Sectors { return dmtable.Sectors(f.u64(field)) }

// i64 reads a signed number (kernel major/minor are -1 when inactive).
func (f *fieldReader) i64(field string) int64 {
	s := f.str(field)
	if s == "" {
		return -1
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		f.fail(field, "%q is not a number", s)
	}
	return v
}

func (f *fieldReader) flag(field string) bool {
	switch s := f.str(field); s {
	case "1":
		return true
	case "0", "", "-1": // -1: unknown (kernel state of an inactive LV)
		return false
	default:
		f.fail(field, "%q is not 0 or 1 (was --binary lost?)", s)
		return false
	}
}

// dev reads a major/minor pair; ok is false when either is negative or
// empty (a missing device, an inactive LV).
func (f *fieldReader) dev(major, minor string) (dmtable.Dev, bool) {
	ma, mi := f.i64(major), f.i64(minor)
	if ma < 0 || mi < 0 || ma > 1<<32-1 || mi > 1<<32-1 {
		return dmtable.Dev{}, false
	}
	return dmtable.Dev{Major: uint32(ma), Minor: uint32(mi)}, true
}
