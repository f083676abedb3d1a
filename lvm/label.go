package lvm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"

	"github.com/dmconvert/dmconvert/dmtable"
)

// The on-disk PV label (lvm2 lib/label/label.h, lib/format_text/layout.h).
// LVM looks for it in sectors 0-3; in it:
//
//	label_header: id "LABELONE" [0:8], sector_xl u64 [8:16] (the sector
//	  the label is in), crc_xl u32 [16:20] (over [20:512]), offset_xl
//	  u32 [20:24] (where pv_header starts, 32), type "LVM2 001" [24:32]
//	pv_header: pv_uuid [32]byte, device_size_xl u64 (bytes), then two
//	  lists of disk_locn {offset u64, size u64} (bytes), each ended by a
//	  zero entry: the data areas (one: offset = pe_start, size 0), then
//	  the metadata areas (one at 4 KiB; a second at the end of the PV
//	  when it was made with --pvmetadatacopies 2)
//	pv_header_extension: version u32, flags u32, bootloader areas list.
//
// All little-endian. The label is read here only to learn where the
// metadata areas are: lvm reports their count and size, not their place.
const (
	labelScanSectors = 4
	labelID          = "LABELONE"
	labelType        = "LVM2 001"
	labelInitialCRC  = 0xf597a6cf
)

// Area is a byte range of a PV expressed in sectors.
type Area struct {
	Start dmtable.Sectors `json:"start"`
	Size  dmtable.Sectors `json:"size"` // 0 for a data area means "to the end of the PV"
}

// End is Start+Size.
func (a Area) End() dmtable.Sectors { return a.Start + a.Size }

// Label is the decoded PV label.
type Label struct {
	Sector        dmtable.Sectors `json:"sector"`         // 0-3, where the label sits
	UUID          string          `json:"uuid"`           // with lvm's dashes, as reports print it
	DeviceSize    dmtable.Sectors `json:"device_size"`    // as last written to the label (see PVInfo.End)
	DataAreas     []Area          `json:"data_areas"`     // normally one: {pe_start, 0}
	MetadataAreas []Area          `json:"metadata_areas"` // in on-disk order: index 0 at the start, 1 at the end
	Extension     uint32          `json:"extension"`      // pv_header_extension version (0: none)
	Bootloader    []Area          `json:"bootloader_areas"`
}

// lvmCRC is lvm2's calc_crc(INITIAL_CRC, ...): a reflected CRC-32 with
// the IEEE polynomial starting at 0xf597a6cf and no final inversion.
func lvmCRC(b []byte) uint32 {
	// crc32.Update inverts on entry and on exit; pre-invert to cancel both.
	return ^crc32.Update(^uint32(labelInitialCRC), crc32.IEEETable, b)
}

// errNoLabel: none of sectors 0-3 holds a valid LVM2 label.
var errNoLabel = errors.New("no LVM2 label in sectors 0-3")

// ParseLabel decodes the LVM2 PV label from the first 2 KiB (at least)
// of a device. A sector counts as the label only if, as for lvm, it starts
// with LABELONE, names its own sector number, has a valid CRC and the
// type "LVM2 001".
func ParseLabel(head []byte) (*Label, error) {
	for s := 0; s < labelScanSectors; s++ {
		off := s * dmtable.SectorSize
		if len(head) < off+dmtable.SectorSize {
			break
		}
		sec := head[off : off+dmtable.SectorSize]
		if string(sec[0:8]) != labelID || binary.LittleEndian.Uint64(sec[8:16]) != uint64(s) ||
			string(sec[24:32]) != labelType || lvmCRC(sec[20:]) != binary.LittleEndian.Uint32(sec[16:20]) {
			continue
		}
		l, err := parsePVHeader(sec)
		if err != nil {
			return nil, fmt.Errorf("LVM2 label in sector %d: %w", s, err)
		}
		l.Sector = dmtable.Sectors(s)
		return l, nil
	}
	return nil, errNoLabel
}

func parsePVHeader(sec []byte) (*Label, error) {
	p := int(binary.LittleEndian.Uint32(sec[20:24]))
	if p < 32 || p+32+8 > len(sec) {
		return nil, fmt.Errorf("pv_header offset %d out of the sector", p)
	}
	l := &Label{UUID: formatUUID(sec[p : p+32])}
	var err error
	if l.DeviceSize, err = bytesToSectors(binary.LittleEndian.Uint64(sec[p+32 : p+40])); err != nil {
		return nil, fmt.Errorf("device size: %w", err)
	}
	p += 40
	// readList reads disk_locn entries up to the terminating zero entry.
	readList := func(what string) ([]Area, error) {
		var as []Area
		for {
			if p+16 > len(sec) {
				return nil, fmt.Errorf("%s list runs past the label sector", what)
			}
			off := binary.LittleEndian.Uint64(sec[p : p+8])
			size := binary.LittleEndian.Uint64(sec[p+8 : p+16])
			p += 16
			if off == 0 && size == 0 {
				return as, nil
			}
			so, err1 := bytesToSectors(off)
			ss, err2 := bytesToSectors(size)
			if err := errors.Join(err1, err2); err != nil {
				return nil, fmt.Errorf("%s area: %w", what, err)
			}
			as = append(as, Area{Start: so, Size: ss})
		}
	}
	if l.DataAreas, err = readList("data"); err != nil {
		return nil, err
	}
	if l.MetadataAreas, err = readList("metadata"); err != nil {
		return nil, err
	}
	// pv_header_extension (lvm2 >= 2.02.116); absent on very old PVs,
	// where these bytes are zero.
	if p+8 <= len(sec) {
		l.Extension = binary.LittleEndian.Uint32(sec[p : p+4])
		p += 8
		if l.Extension > 0 {
			if l.Bootloader, err = readList("bootloader"); err != nil {
				return nil, err
			}
		}
	}
	return l, nil
}

func bytesToSectors(b uint64) (dmtable.Sectors, error) {
	return dmtable.SectorsFromBytes(b)
}

// formatUUID prints a 32-character LVM ID with lvm's dashes (6-4-4-4-4-4-6).
func formatUUID(id []byte) string {
	id = bytes.TrimRight(id, "\x00")
	if len(id) != 32 {
		return string(id)
	}
	groups := []int{6, 4, 4, 4, 4, 4, 6}
	var b bytes.Buffer
	i := 0
	for g, n := range groups {
		if g > 0 {
			b.WriteByte('-')
		}
		b.Write(id[i : i+n])
		i += n
	}
	return b.String()
}

// ReadLabel reads and decodes the PV label of a device (or image file).
func ReadLabel(path string) (*Label, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading LVM label: %w", err)
	}
	defer f.Close()
	head := make([]byte, labelScanSectors*dmtable.SectorSize)
	if _, err := io.ReadFull(f, head); err != nil {
		return nil, fmt.Errorf("reading LVM label of %s: %w", path, err)
	}
	l, err := ParseLabel(head)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return l, nil
}
