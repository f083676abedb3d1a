package convert

import (
	"os"
	"testing"
)

func TestIdentifyRealPVLabel(t *testing.T) {
	// testdata/pv-head-4k.bin: the first 4 KiB of a loop device after
	// `pvcreate` (lvm2 2.03.16).
	b, err := os.ReadFile("testdata/pv-head-4k.bin")
	if err != nil {
		t.Fatal(err)
	}
	if got := Identify(b); got != IdentityLVM {
		t.Fatalf("Identify(pvcreate output) = %v, want LVM", got)
	}
	// One flipped bit in the label's CRC-covered part: no longer a label.
	c := append([]byte(nil), b...)
	c[512+40] ^= 1
	if HasLVMLabel(c) {
		t.Fatal("label with a bad CRC accepted")
	}
	// The label moved to another sector without updating sector_xl.
	d := make([]byte, 4096)
	copy(d[1024:1536], b[512:1024])
	if HasLVMLabel(d) {
		t.Fatal("label in the wrong sector accepted")
	}
	// Sectors 1-7 wiped, as the identity switch's 4 KiB write does.
	e := append([]byte(nil), b...)
	copy(e[0:], "LUKS\xba\xbe")
	for i := 512; i < 4096; i++ {
		e[i] = 0
	}
	if got := Identify(e); got != IdentityLUKS {
		t.Fatalf("after the switch: %v, want LUKS", got)
	}
	if got := Identify(make([]byte, 4096)); got != IdentityUnknown {
		t.Fatalf("zeros: %v", got)
	}
	if got := Identify(append([]byte("DMCVT\xba\xbe"), make([]byte, 4089)...)); got != IdentityDisguisedLUKS1 {
		t.Fatalf("disguised: %v", got)
	}
	if got := Identify(b[:100]); got != IdentityUnknown {
		t.Fatalf("short buffer: %v", got)
	}
}
