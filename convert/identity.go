package convert

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"strings"
)

// Identity is what the first 4 KiB of a disk say it is.
type Identity int

const (
	// IdentityUnknown: neither an LVM label nor a LUKS header.
	IdentityUnknown Identity = iota
	// IdentityLVM: an LVM2 PV label in one of sectors 0-3.
	IdentityLVM
	// IdentityLUKS: a LUKS1 or LUKS2 magic at byte 0.
	IdentityLUKS
	// IdentityDisguisedLUKS1: a LUKS1 header with dmconvert's in-progress
	// magic (a LUKS1 conversion under way).
	IdentityDisguisedLUKS1
)

func (i Identity) String() string {
	switch i {
	case IdentityLVM:
		return "LVM physical volume"
	case IdentityLUKS:
		return "LUKS header"
	case IdentityDisguisedLUKS1:
		return "LUKS1 header of a dmconvert run in progress"
	}
	return "no LVM label or LUKS header"
}

var (
	luksMagic      = []byte("LUKS\xba\xbe")
	luks2MagicAlt  = []byte("SKUL\xba\xbe") // LUKS2 secondary header magic
	disguisedMagic = []byte("DMCVT\xba\xbe")
	lvmLabelID     = []byte("LABELONE")
	lvmLabelType   = []byte("LVM2 001")
)

// Identify classifies the first 4 KiB (or more) of a disk. An LVM label is
// recognised the way LVM does: "LABELONE" at the start of sector 0, 1, 2
// or 3, its own sector number recorded in it, the CRC over the rest of the
// label header valid, and type "LVM2 001".
func Identify(first []byte) Identity {
	if len(first) >= len(luksMagic) && bytes.HasPrefix(first, luksMagic) {
		return IdentityLUKS
	}
	if bytes.HasPrefix(first, disguisedMagic) {
		return IdentityDisguisedLUKS1
	}
	if HasLVMLabel(first) {
		return IdentityLVM
	}
	return IdentityUnknown
}

// HasLVMLabel reports whether an LVM2 label is in sectors 0-3 of b.
func HasLVMLabel(b []byte) bool {
	_, ok := lvmLabelSector(b)
	return ok
}

// LVMLabelPVUUID returns the PV UUID of the LVM2 label in sectors 0-3 of
// b, as LVM prints it (6-4-4-4-4-4-6 characters with dashes).
func LVMLabelPVUUID(b []byte) (string, bool) {
	sec, ok := lvmLabelSector(b)
	if !ok {
		return "", false
	}
	// offset_xl: where struct pv_header starts in the sector; its
	// first field is the 32-character id.
	off := int(binary.LittleEndian.Uint32(sec[20:24]))
	if off < 32 || off+32 > len(sec) {
		return "", false
	}
	id := string(sec[off : off+32])
	var out []byte
	for i, n := range []int{6, 4, 4, 4, 4, 4, 6} {
		if i > 0 {
			out = append(out, '-')
		}
		out = append(out, id[:n]...)
		id = id[n:]
	}
	return string(out), true
}

// sameUUID compares two UUIDs ignoring dashes and case.
func sameUUID(a, b string) bool {
	strip := func(s string) string { return strings.ToLower(strings.ReplaceAll(s, "-", "")) }
	return strip(a) == strip(b)
}

// luksUUIDAt returns the UUID field of a LUKS1, LUKS2 (primary or
// secondary) or disguised LUKS1 binary header at the start of b: 40 bytes
// at offset 168 in each of them.
func luksUUIDAt(b []byte) (string, bool) {
	if len(b) < 208 || !(bytes.HasPrefix(b, luksMagic) || bytes.HasPrefix(b, luks2MagicAlt) || bytes.HasPrefix(b, disguisedMagic)) {
		return "", false
	}
	return string(bytes.TrimRight(b[168:208], "\x00")), true
}

// lvmLabelSector returns the 512-byte sector of b (one of 0-3) that holds
// a valid LVM2 label.
func lvmLabelSector(b []byte) ([]byte, bool) {
	for s := 0; s < 4; s++ {
		off := s * 512
		if len(b) < off+512 {
			return nil, false
		}
		sec := b[off : off+512]
		if !bytes.Equal(sec[0:8], lvmLabelID) {
			continue
		}
		// struct label_header: id[8], sector_xl u64, crc_xl u32,
		// offset_xl u32, type[8]; crc covers from offset_xl to the end
		// of the sector, with LVM's own CRC (the "calc_crc" with
		// initial value 0xf597a6cf).
		if binary.LittleEndian.Uint64(sec[8:16]) != uint64(s) {
			continue
		}
		if !bytes.Equal(sec[24:32], lvmLabelType) {
			continue
		}
		if lvmCRC(sec[20:512]) != binary.LittleEndian.Uint32(sec[16:20]) {
			continue
		}
		return sec, true
	}
	return nil, false
}

// lvmCRC is LVM2's calc_crc(INITIAL_CRC, ...): a reflected CRC-32 with the
// IEEE polynomial, initial value 0xf597a6cf and no final xor.
func lvmCRC(b []byte) uint32 {
	// crc32.Update inverts the value on entry and on exit; pre-invert so
	// the net effect is "start at 0xf597a6cf, no final xor".
	return ^crc32.Update(^uint32(0xf597a6cf), crc32.IEEETable, b)
}
