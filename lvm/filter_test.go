package lvm

import "testing"

// TestFilterRejects: LVM's regex filter rule, name by name, first match
// wins; any accepted name passes the device; no match passes it.
func TestFilterRejects(t *testing.T) {
	names := []string{"/dev/mapper/vda_crypt", "/dev/dm-3", "/dev/disk/by-id/dm-name-vda_crypt"}
	for _, c := range []struct {
		filter   string
		rejected bool
		pattern  string
	}{
		{`["a|.*|"]`, false, ""},
		{`a|.*|`, false, ""}, // one pattern, unquoted by configValues
		{``, false, ""},
		{`["a|^/dev/vda$|","r|.*|"]`, true, "r|.*|"},
		{`["a|^/dev/vd.*|","a|^/dev/dm-.*|","r|.*|"]`, false, ""},
		{`["a|/dev/mapper/mpath.*|","r|.*|"]`, true, "r|.*|"},
		{`["r|/dev/mapper/vda_crypt|"]`, true, "r|/dev/mapper/vda_crypt|"},
		// Another name accepted: the device passes.
		{`["r|/dev/mapper/|","a|/dev/dm-|"]`, false, ""},
		// First match wins for a name: the mapper name is rejected, but
		// /dev/dm-3 is accepted, so LVM sees the device.
		{`["r|crypt|","a|.*|"]`, false, ""},
		{`["r|crypt|","r|dm-|","a|.*|"]`, true, "r|crypt|"},
		{`["r|^/dev/sdb$|"]`, false, ""},
		// Separators that pair, and escapes as lvmconfig prints them.
		{`["a(^/dev/mapper/vda_crypt$)","r{.*}"]`, false, ""},
		{`["a|vda\\_crypt|","r|.*|"]`, false, ""},
	} {
		pats, ok := parseFilterValue(c.filter)
		if !ok {
			t.Fatalf("%s: not parsed", c.filter)
		}
		pat, rejected, ok := filterRejects(pats, names)
		if !ok || rejected != c.rejected || pat != c.pattern {
			t.Errorf("%s: rejected %v by %q (readable %v), want %v by %q", c.filter, rejected, pat, ok, c.rejected, c.pattern)
		}
	}
	// Unreadable: not judged.
	for _, bad := range []string{`["x|.*|"]`, `["a|.*"]`, `["a|(|"]`, `[broken`} {
		if pats, ok := parseFilterValue(bad); ok {
			if _, _, ok := filterRejects(pats, names); ok {
				t.Errorf("%s: judged", bad)
			}
		}
	}
}
