package lvm

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
)

var devZero dmtable.Dev

func readFixture(t *testing.T, parts ...string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(append([]string{"testdata", "replay"}, parts...)...))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Labels written by lvm 2.03.16 in the guest.
func TestParseLabel(t *testing.T) {
	// pvcreate defaults: label in sector 1, data at 1 MiB, one 1020 KiB
	// metadata area at 4 KiB, extension version 2.
	l, err := ParseLabel(readFixture(t, "discover-mixed-a", "004-label.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if l.Sector != 1 || l.DeviceSize != 524288 || l.Extension != 2 || len(l.Bootloader) != 0 ||
		!slices.Equal(l.DataAreas, []Area{{Start: 2048}}) || !slices.Equal(l.MetadataAreas, []Area{{Start: 8, Size: 2040}}) {
		t.Errorf("label %+v", l)
	}
	if len(l.UUID) != 38 || l.UUID[6] != '-' {
		t.Errorf("uuid %q", l.UUID)
	}
	// --pvmetadatacopies 2: the second area fills the last 1 MiB.
	l, err = ParseLabel(readFixture(t, "shrink-2mda", "004-label.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(l.MetadataAreas, []Area{{Start: 8, Size: 2040}, {Start: 524288 - 2048, Size: 2048}}) || l.DeviceSize != 524288 {
		t.Errorf("2-mda label %+v", l)
	}
	// After pvresize --setphysicalvolumesize 192512s: the area moved to
	// end at the new size; device_size = size - pe_start - area.
	l, err = ParseLabel(readFixture(t, "shrink-2mda", "013-label.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(l.MetadataAreas, []Area{{Start: 8, Size: 2040}, {Start: 192512 - 2048, Size: 2048}}) || l.DeviceSize != 192512-2048-2048 {
		t.Errorf("resized 2-mda label %+v", l)
	}
}

func TestParseLabelRejects(t *testing.T) {
	good := readFixture(t, "discover-mixed-a", "004-label.bin")
	if _, err := ParseLabel(make([]byte, 2048)); !errors.Is(err, errNoLabel) {
		t.Errorf("zeros: %v", err)
	}
	if _, err := ParseLabel(good[:1000]); !errors.Is(err, errNoLabel) {
		t.Errorf("short read (label sector cut): %v", err)
	}
	// A flipped bit in the CRC-covered part.
	bad := slices.Clone(good)
	bad[512+100] ^= 1
	if _, err := ParseLabel(bad); !errors.Is(err, errNoLabel) {
		t.Errorf("bad CRC: %v", err)
	}
	// A label that names another sector than its own.
	bad = slices.Clone(good)
	binary.LittleEndian.PutUint64(bad[512+8:], 2)
	if _, err := ParseLabel(bad); !errors.Is(err, errNoLabel) {
		t.Errorf("wrong sector number: %v", err)
	}
	// The same label moved to sector 3 (and renumbered) is found there.
	moved := make([]byte, 2048)
	copy(moved[3*512:], good[512:1024])
	binary.LittleEndian.PutUint64(moved[3*512+8:], 3)
	binary.LittleEndian.PutUint32(moved[3*512+16:], lvmCRC(moved[3*512+20:4*512]))
	if l, err := ParseLabel(moved); err != nil || l.Sector != 3 {
		t.Errorf("label in sector 3: %+v %v", l, err)
	}
	// A pv_header offset past the sector, with a valid CRC.
	bad = slices.Clone(good)
	binary.LittleEndian.PutUint32(bad[512+20:], 500)
	binary.LittleEndian.PutUint32(bad[512+16:], lvmCRC(bad[512+20:1024]))
	if _, err := ParseLabel(bad); err == nil || errors.Is(err, errNoLabel) {
		t.Errorf("bad pv_header offset: %v", err)
	}
}

func TestReadLabelFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, readFixture(t, "discover-mixed-a", "004-label.bin"), 0o644); err != nil {
		t.Fatal(err)
	}
	if l, err := ReadLabel(p); err != nil || l.Sector != 1 {
		t.Errorf("ReadLabel: %+v %v", l, err)
	}
	if err := os.WriteFile(p, make([]byte, 100), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadLabel(p); err == nil {
		t.Error("ReadLabel of a 100-byte file succeeded")
	}
}

func TestFormatUUID(t *testing.T) {
	if got := formatUUID([]byte("ucDfWz7cxHQ3epe72rhdQiPAz3kfPKad")); got != "ucDfWz-7cxH-Q3ep-e72r-hdQi-PAz3-kfPKad" {
		t.Errorf("formatUUID = %s", got)
	}
}
