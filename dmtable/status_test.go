package dmtable

import (
	"strings"
	"testing"
)

// Status lines as the kernel prints them (`dmsetup status`, trailing space
// after empty parameters dropped). FACTS.md/REPORT.md (kernel 6.1) and the
// guest differential tests.
var kernelStatusLines = []string{
	// REPORT.md (anchor B, kernel 6.1): syncing and synced.
	"458752 32768 mirror 2 254:0 253:3 12/32 1 AA 1 core",
	"458752 32768 mirror 2 254:0 253:3 32/32 1 AA 1 core",
	// Kernel 6.1 in the test VM (TestGuestDifferentialTables,
	// TestGuestMirrorSync log them).
	"0 32768 mirror 2 254:0 254:16 0/32 1 AA 1 core",
	"0 32768 mirror 2 254:0 254:16 20/32 1 AA 1 core",
	"0 32768 mirror 2 254:0 254:16 32/32 1 AA 3 disk 253:0 A",
	"0 16384 striped 2 254:0 254:16 1 AA",
	"0 131072 linear",
	"8192 8192 linear",
	"0 16384 crypt",
	"0 2048 error",
	"1024 1024 zero",
}

func TestParseStatusRoundTrip(t *testing.T) {
	for _, l := range kernelStatusLines {
		s, err := ParseStatus(l)
		if err != nil {
			t.Errorf("ParseStatus(%q): %v", l, err)
			continue
		}
		if s.String() != l {
			t.Errorf("round trip: got %q, want %q", s.String(), l)
		}
		if s.TargetType == "mirror" {
			if s.Mirror == nil {
				t.Fatalf("%q: no mirror status", l)
			}
			if s.Mirror.String() != s.Raw {
				t.Errorf("mirror String() %q, raw %q", s.Mirror.String(), s.Raw)
			}
		}
	}
}

func TestMirrorStatus(t *testing.T) {
	s, err := ParseStatus("458752 32768 mirror 2 254:0 253:3 12/32 1 AA 1 core")
	if err != nil {
		t.Fatal(err)
	}
	m := s.Mirror
	if len(m.Legs) != 2 || m.Legs[0].Num != (Dev{254, 0}) || m.Legs[1].Num != (Dev{253, 3}) ||
		m.InSync != 12 || m.Regions != 32 || m.Health != "AA" || m.Log.Type != "core" || len(m.Log.Args) != 0 {
		t.Fatalf("parsed %+v", m)
	}
	if m.Synced() {
		t.Fatal("12/32 reported synced")
	}
	cases := map[string]bool{
		"2 254:0 253:3 32/32 1 AA 1 core":         true,
		"2 254:0 253:3 32/32 1 AD 1 core":         false, // leg 1 write failed
		"2 254:0 253:3 32/32 1 SA 1 core":         false,
		"2 254:0 253:3 32/32 1 AR 1 core":         false,
		"2 254:0 253:3 32/32 1 FA 1 core":         false,
		"2 254:0 253:3 32/32 1 AU 1 core":         false,
		"2 254:0 253:3 31/32 1 AA 1 core":         false,
		"2 254:0 253:3 0/0 1 AA 1 core":           false, // no regions: nothing proven
		"3 254:0 253:3 253:4 7/7 1 AAA 1 core":    true,
		"2 254:0 253:3 32/32 1 AA 3 disk 254:5 A": true,
		"2 254:0 253:3 32/32 1 AA 3 disk 254:5 D": true, // log health is not leg health
	}
	for raw, want := range cases {
		m, err := ParseMirrorStatus(raw)
		if err != nil {
			t.Errorf("%q: %v", raw, err)
			continue
		}
		if m.Synced() != want {
			t.Errorf("%q: Synced() = %v, want %v", raw, m.Synced(), want)
		}
		if m.String() != raw {
			t.Errorf("%q: String() = %q", raw, m.String())
		}
	}
	fm, _ := ParseMirrorStatus("2 254:0 253:3 32/32 1 AD 1 core")
	if f := fm.Failed(); len(f) != 1 || f[0] != 1 {
		t.Fatalf("Failed() = %v", f)
	}
	for _, bad := range []string{
		"", "0 0/0 1 1 core", "2 254:0 253:3 33/32 1 AA 1 core", "2 254:0 253:3 32/32 1 A 1 core",
		"2 254:0 253:3 32/32 1 AX 1 core", "2 254:0 253:3 32/32 2 AA 1 core", "2 254:0 253:3 32 1 AA 1 core",
		"2 254:0 253:3 32/32 1 AA 2 core", "2 254:0 253:3 32/32 1 AA", "2 254:0 32/32 1 AA 1 core",
	} {
		if _, err := ParseMirrorStatus(bad); err == nil {
			t.Errorf("ParseMirrorStatus(%q) accepted", bad)
		}
	}
	if _, err := ParseStatus("0 8 linear 254:0 0"); err == nil {
		t.Error("linear status with parameters accepted")
	}
	if s, err := ParseStatus("0 8 thin 12 34"); err != nil || s.Raw != "12 34" || s.Mirror != nil {
		t.Errorf("unknown status: %+v %v", s, err)
	}
	if !strings.Contains(TargetStatus{Start: 0, Length: 8, TargetType: "zero"}.String(), "zero") {
		t.Error("String")
	}
}
