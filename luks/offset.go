package luks

import (
	"fmt"
	"strconv"
)

// KeyslotAreasEnd is the byte offset where the last keyslot area ends
// (LUKS2), or where the last keyslot's key material ends (LUKS1): no data
// may start below it.
func (h *Header) KeyslotAreasEnd() int64 {
	if h.v1 != nil {
		return int64(h.v1.materialEnd())
	}
	l := h.v2
	end := uint64(2 * l.hdrSize)
	for _, id := range l.activeKeyslots() {
		o, _ := l.sec("keyslots").getObject(strconv.Itoa(id))
		a, _ := needObject(o, "area", "keyslot")
		if a == nil {
			continue
		}
		off, _ := needU64(a, "offset", "area")
		size, _ := needU64(a, "size", "area")
		end = max(end, off+size)
	}
	return int64(end)
}

// SetDataOffset moves the LUKS2 data segment to start at off bytes and
// sizes the keyslots area to fill the space before it, in memory (written
// by the next WriteMetadata or Image). Every keyslot area must end at or
// before off. Online rekey uses it: the data moves toward the start of the
// device by a gap taken from the unused end of the keyslots area.
//
// LUKS1: the payload offset moves to off (a multiple of 512, at or after
// the end of the keyslot material); not while a key is staged.
func (h *Header) SetDataOffset(off int64) error {
	if h.v1 != nil {
		return h.setDataOffset1(off)
	}
	l := h.v2
	if off <= 0 || off%luks2AreaAlign != 0 {
		return fmt.Errorf("data offset %d is not a positive multiple of %d: %w", off, luks2AreaAlign, ErrInvalidArgument)
	}
	if end := h.KeyslotAreasEnd(); off < end {
		return fmt.Errorf("data offset %d would cut keyslot areas that end at %d: %w", off, end, ErrNoSpace)
	}
	ks := uint64(off) - 2*l.hdrSize
	if ks > luks2MaxKeyslotsSize {
		ks = luks2MaxKeyslotsSize
	}
	seg, err := l.dataSegment()
	if err != nil {
		return err
	}
	// Sections and their objects are parsed copies: set them back.
	segs := l.sec("segments")
	s, err := segs.getObject(strconv.Itoa(seg.id))
	if err != nil || s == nil {
		return corruptf("segment %d", seg.id)
	}
	s.set("offset", jsonRaw(strconv.FormatInt(off, 10)))
	segs.setObject(strconv.Itoa(seg.id), s)
	l.setSec("segments", segs)
	cfg := l.sec("config")
	cfg.set("keyslots_size", jsonRaw(strconv.FormatUint(ks, 10)))
	l.setSec("config", cfg)
	area := make([]byte, ks)
	copy(area, l.area)
	l.area = area
	return nil
}

// SetDetachedSegment makes a LUKS2 header a detached one (kept in a file
// apart from the data device): its data segment starts at off bytes of
// the data device (0 for the whole device) and, when size > 0, covers
// exactly size bytes (else "dynamic": to the device's end). The keyslots
// area is left as it is.
func (h *Header) SetDetachedSegment(off, size int64) error {
	if h.v1 != nil {
		return fmt.Errorf("a detached data segment needs LUKS2: %w", ErrInvalidArgument)
	}
	l := h.v2
	seg, err := l.dataSegment()
	if err != nil {
		return err
	}
	if off < 0 || off%512 != 0 || off%int64(seg.sectorSize) != 0 || size < 0 || size%int64(seg.sectorSize) != 0 {
		return fmt.Errorf("data segment at %d, %d bytes: not whole %d-byte sectors: %w", off, size, seg.sectorSize, ErrInvalidArgument)
	}
	segs := l.sec("segments")
	s, err := segs.getObject(strconv.Itoa(seg.id))
	if err != nil || s == nil {
		return corruptf("segment %d", seg.id)
	}
	s.set("offset", jsonRaw(strconv.FormatInt(off, 10)))
	if size > 0 {
		s.set("size", jsonRaw(strconv.FormatInt(size, 10)))
	} else {
		s.set("size", jsonRaw("dynamic"))
	}
	segs.setObject(strconv.Itoa(seg.id), s)
	l.setSec("segments", segs)
	return nil
}
