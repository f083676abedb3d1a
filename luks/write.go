package luks

import (
	"fmt"
	"io"
)

// FirstBlockSize is the size of the block that decides what a disk is
// (design.md section 3): the LUKS2 primary binary header or the LUKS1
// phdr plus padding.
const FirstBlockSize = 4096

// Image returns the whole header area, HeaderSize bytes, as it should be
// on the device: for LUKS2 the primary and secondary metadata copies
// (with the current sequence id; see WriteMetadata), the keyslots area,
// and zeros up to the data offset; for LUKS1 the phdr (disguised if so
// marked), the keyslot material, zeros, and the dmconvert checkpoint
// record if one is set (see SaveCheckpoint). Image[:FirstBlockSize] is the
// first block; the engine may write it separately from the rest.
func (h *Header) Image() ([]byte, error) {
	img := make([]byte, h.HeaderSize())
	if h.v1 != nil {
		l := h.v1
		copy(img, l.body)
		copy(img, l.encodePhdr())
		if h.ckptValid {
			area, err := h.CheckpointArea()
			if err != nil {
				return nil, err
			}
			slot := int64(h.ckptSeq % 2)
			copy(img[area+slot*CheckpointRecordSize:], encodeCheckpointRecord(h.ckptSeq, h.ckptPayload))
		}
		return img, nil
	}
	l := h.v2
	for i, sec := range []bool{false, true} {
		c, err := l.metadataCopy(sec)
		if err != nil {
			return nil, err
		}
		copy(img[uint64(i)*l.hdrSize:], c)
	}
	copy(img[2*l.hdrSize:], l.area)
	return img, nil
}

// FirstBlock returns Image()[:FirstBlockSize] without building the rest.
func (h *Header) FirstBlock() ([]byte, error) {
	if h.v1 != nil {
		b := make([]byte, FirstBlockSize)
		copy(b, h.v1.body)
		copy(b, h.v1.encodePhdr())
		return b, nil
	}
	c, err := h.v2.metadataCopy(false)
	if err != nil {
		return nil, err
	}
	return c[:FirstBlockSize], nil
}

// WriteOrder tells WriteHeader which part of the image goes first.
type WriteOrder int

const (
	// FirstBlockFirst writes [0,4K), syncs, then the rest: the identity
	// switch label -> LUKS (design.md section 3, phase 3).
	FirstBlockFirst WriteOrder = iota
	// FirstBlockLast writes [4K,HeaderSize), syncs, then [0,4K): the first
	// block becomes valid only when everything it describes is in place.
	FirstBlockLast
)

type syncer interface{ Sync() error }

func syncIfPossible(w io.WriterAt) error {
	if s, ok := w.(syncer); ok {
		return s.Sync()
	}
	return nil
}

func writeFull(w io.WriterAt, b []byte, off int64) error {
	n, err := w.WriteAt(b, off)
	if err == nil && n != len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("writing %d bytes at offset %d: %w", len(b), off, err)
	}
	return nil
}

// WriteHeader writes the whole Image to w in two writes ordered by order,
// syncing after each if w has a Sync method (an *os.File does). It writes
// nothing beyond HeaderSize.
func (h *Header) WriteHeader(w io.WriterAt, order WriteOrder) error {
	img, err := h.Image()
	if err != nil {
		return err
	}
	defer wipe(img) // holds no key, but keyslot material need not linger
	parts := [][2]int64{{0, FirstBlockSize}, {FirstBlockSize, int64(len(img))}}
	if order == FirstBlockLast {
		parts[0], parts[1] = parts[1], parts[0]
	}
	for _, p := range parts {
		if p[0] >= p[1] {
			continue
		}
		if err := writeFull(w, img[p[0]:p[1]], p[0]); err != nil {
			return err
		}
		if err := syncIfPossible(w); err != nil {
			return err
		}
	}
	h.dirtyBefore, h.dirtyAfter = nil, nil
	return nil
}

// BumpSeqID increments the LUKS2 sequence id without writing; Image then
// carries the new value. WriteMetadata and Commit bump it themselves.
func (h *Header) BumpSeqID() {
	if h.v2 != nil {
		h.v2.seqid++
	}
}

// MetadataImage returns both LUKS2 metadata copies (2*MetadataSize bytes,
// for offset 0) with the current sequence id.
func (h *Header) MetadataImage() ([]byte, error) {
	if h.v2 == nil {
		return nil, fmt.Errorf("metadata copies are LUKS2 only: %w", ErrUnsupported)
	}
	out := make([]byte, 2*h.v2.hdrSize)
	for i, sec := range []bool{false, true} {
		c, err := h.v2.metadataCopy(sec)
		if err != nil {
			return nil, err
		}
		copy(out[uint64(i)*h.v2.hdrSize:], c)
	}
	return out, nil
}

// WriteMetadata writes the metadata only, never keyslot material: for
// LUKS2 it increments the sequence id and rewrites the primary copy, then
// the secondary (cryptsetup's order), each followed by a sync if w can;
// a crash in between leaves one valid copy with the old or the new
// content, and Read takes the newer. For LUKS1 it rewrites the phdr
// (first 1024 bytes). This is the per-step checkpoint write for LUKS2.
func (h *Header) WriteMetadata(w io.WriterAt) error {
	if h.v1 != nil {
		if err := writeFull(w, h.v1.encodePhdr(), 0); err != nil {
			return err
		}
		return syncIfPossible(w)
	}
	l := h.v2
	if _, err := l.jsonText(); err != nil {
		return err
	}
	l.seqid++
	for _, sec := range []bool{false, true} {
		c, err := l.metadataCopy(sec)
		if err != nil {
			l.seqid--
			return err
		}
		off := int64(0)
		if sec {
			off = int64(l.hdrSize)
		}
		if err := writeFull(w, c, off); err != nil {
			return err
		}
		if err := syncIfPossible(w); err != nil {
			return err
		}
	}
	for i := range l.copies {
		l.copies[i].Valid, l.copies[i].Err, l.copies[i].SeqID = true, nil, l.seqid
	}
	return nil
}

// Commit writes pending keyslot changes safely ordered: material of new
// keyslots first (into areas no metadata references yet), then the
// metadata (WriteMetadata), then the random wipe of removed keyslots'
// material (no longer referenced).
func (h *Header) Commit(w io.WriterAt) error {
	for _, s := range h.dirtyBefore {
		if err := writeFull(w, h.bytesAt(s), s.off); err != nil {
			return err
		}
	}
	if len(h.dirtyBefore) > 0 {
		if err := syncIfPossible(w); err != nil {
			return err
		}
	}
	if err := h.WriteMetadata(w); err != nil {
		return err
	}
	for _, s := range h.dirtyAfter {
		if err := writeFull(w, h.bytesAt(s), s.off); err != nil {
			return err
		}
	}
	if len(h.dirtyAfter) > 0 {
		if err := syncIfPossible(w); err != nil {
			return err
		}
	}
	h.dirtyBefore, h.dirtyAfter = nil, nil
	return nil
}

func (h *Header) bytesAt(s span) []byte {
	if h.v1 != nil {
		return h.v1.body[s.off : s.off+s.size]
	}
	start := s.off - int64(2*h.v2.hdrSize)
	return h.v2.area[start : start+s.size]
}
