package lvm

import "testing"

func TestParseRecordedSize(t *testing.T) {
	// Excerpt of `vgcfgbackup -f` output from lvm2 2.03.16 in the test VM,
	// after pvresize --setphysicalvolumesize 200m.
	text := []byte(`vgx {
	id = "Ab12Cd-0000-0000-0000-0000-0000-000000"
	seqno = 2
	physical_volumes {

		pv0 {
			id = "TYHR1B-XcRp-K5Nz-Du3y-30GV-eqTw-35q5ki"
			device = "/dev/vda"	# Hint only

			status = ["ALLOCATABLE"]
			flags = []
			dev_size = 407552	# 199 Megabytes
			pe_start = 2048
			pe_count = 49	# 196 Megabytes
		}

		pv1 {
			id = "other0-0000-0000-0000-0000-0000-000000"
			dev_size = 999
		}
	}
}
`)
	n, err := parseRecordedSize(text, "TYHR1B-XcRp-K5Nz-Du3y-30GV-eqTw-35q5ki")
	if err != nil || n != 407552 {
		t.Fatalf("got %d, %v; want 407552", n, err)
	}
	n, err = parseRecordedSize(text, "other0-0000-0000-0000-0000-0000-000000")
	if err != nil || n != 999 {
		t.Fatalf("second PV: got %d, %v", n, err)
	}
	if _, err := parseRecordedSize(text, "missing"); err == nil {
		t.Fatal("unknown PV accepted")
	}
	// The VG's own id must not be taken for a PV's.
	if _, err := parseRecordedSize(text, "Ab12Cd-0000-0000-0000-0000-0000-000000"); err == nil {
		t.Fatal("VG id matched as a PV")
	}
}
