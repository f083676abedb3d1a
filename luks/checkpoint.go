package luks

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
)

// dmconvert checkpoints live in the header:
//
//   - LUKS2: a token {"type":"dmconvert","keyslots":[],"checkpoint":"<base64>"};
//     SaveCheckpoint rewrites both metadata copies with seqid+1.
//   - LUKS1: two alternating 512-byte records in the last 4 KiB of the
//     header area (the 4 KiB before the data offset), which must lie
//     beyond the keyslot material (CheckCheckpointRoom). Record layout:
//
//     [0,8)    magic "DMCVTCKP"
//     [8,16)   sequence number, big-endian
//     [16,20)  payload length, big-endian (<= CheckpointPayloadMax)
//     [20,24)  CRC32C (Castagnoli) of the whole record with this field zeroed
//     [24,..)  payload, zero padded to 512 bytes (the padding is covered by
//              the CRC, so any torn sector is detected)
//
//     Record n goes to slot n%2 (offset area+512*(n%2)), so a torn write
//     can only damage the record being replaced; the valid record with the
//     highest sequence number wins.
//
// The payload is opaque bytes (the engine's checkpoint).

const (
	// CheckpointRecordSize is the size of one LUKS1 checkpoint record.
	CheckpointRecordSize = 512
	// CheckpointPayloadMax is the largest LUKS1 checkpoint payload.
	CheckpointPayloadMax = CheckpointRecordSize - 24
	// checkpointRoom is the region at the end of the LUKS1 header area
	// reserved for the records.
	checkpointRoom = 4096
)

var checkpointMagic = []byte("DMCVTCKP")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func encodeCheckpointRecord(seq uint64, payload []byte) []byte {
	b := make([]byte, CheckpointRecordSize)
	copy(b, checkpointMagic)
	binary.BigEndian.PutUint64(b[8:], seq)
	binary.BigEndian.PutUint32(b[16:], uint32(len(payload)))
	copy(b[24:], payload)
	binary.BigEndian.PutUint32(b[20:], recordCRC(b))
	return b
}

func decodeCheckpointRecord(b []byte) (uint64, []byte, bool) {
	if len(b) < CheckpointRecordSize || !bytes.Equal(b[:8], checkpointMagic) {
		return 0, nil, false
	}
	n := binary.BigEndian.Uint32(b[16:])
	if n > CheckpointPayloadMax {
		return 0, nil, false
	}
	if recordCRC(b) != binary.BigEndian.Uint32(b[20:]) {
		return 0, nil, false
	}
	for _, c := range b[24+n : CheckpointRecordSize] {
		if c != 0 {
			return 0, nil, false
		}
	}
	return binary.BigEndian.Uint64(b[8:]), slices.Clone(b[24 : 24+n]), true
}

func recordCRC(b []byte) uint32 {
	c := crc32.Update(0, castagnoli, b[:20])
	c = crc32.Update(c, castagnoli, []byte{0, 0, 0, 0})
	return crc32.Update(c, castagnoli, b[24:CheckpointRecordSize])
}

// CheckpointArea returns the byte offset of the LUKS1 checkpoint records
// (HeaderSize - 4096), after checking that the keyslot material ends
// before it (it does for cryptsetup's layouts with the default 2 MiB
// header: the material of a 512-bit key ends at 2068480 bytes).
func (h *Header) CheckpointArea() (int64, error) {
	if h.v1 == nil {
		return 0, fmt.Errorf("checkpoint records are LUKS1 only (LUKS2 uses a token): %w", ErrUnsupported)
	}
	if h.v1.payloadOffset == 0 {
		return 0, fmt.Errorf("detached LUKS1 header has no checkpoint room: %w", ErrNoSpace)
	}
	if h.v1.staged != nil {
		// A rekey moves the data into the end of the header area: the
		// records sit after the keyslot material (rekey1.go).
		return h.v1.stagedRecordsArea(), nil
	}
	area := int64(h.v1.payloadOffset)*sectorSize - checkpointRoom
	if end := int64(h.v1.materialEnd()); end > area {
		return 0, fmt.Errorf("LUKS1 keyslot material ends at %d, inside the last 4 KiB of the %d-byte header area reserved for checkpoints (use a header size of at least %d): %w",
			end, h.v1.payloadOffset*sectorSize, int64(alignUp(uint64(end), 4096))+checkpointRoom, ErrNoSpace)
	}
	return area, nil
}

// CheckCheckpointRoom refuses a LUKS1 header whose keyslot material
// reaches into the checkpoint records; it is a no-op for LUKS2.
func (h *Header) CheckCheckpointRoom() error {
	if h.v2 != nil {
		return nil
	}
	_, err := h.CheckpointArea()
	return err
}

// loadCheckpointRecords fills the LUKS1 checkpoint state from r; absent
// or invalid records simply mean "no checkpoint".
func (h *Header) loadCheckpointRecords(r io.ReaderAt) {
	h.ckptSeq, h.ckptPayload, h.ckptValid = 0, nil, false
	area, err := h.CheckpointArea()
	if err != nil {
		return
	}
	b, err := readAt(r, area, 2*CheckpointRecordSize)
	if err != nil {
		return
	}
	for i := 0; i < 2; i++ {
		seq, p, ok := decodeCheckpointRecord(b[i*CheckpointRecordSize:])
		if ok && (!h.ckptValid || seq > h.ckptSeq) {
			h.ckptSeq, h.ckptPayload, h.ckptValid = seq, p, true
		}
	}
}

// LoadCheckpoint re-reads the checkpoint from the device: for LUKS1 the
// record pair (newest valid wins); for LUKS2 the token of this in-memory
// header (re-Read the header to see a newer one). ErrNoCheckpoint if none.
func (h *Header) LoadCheckpoint(r io.ReaderAt) ([]byte, error) {
	if h.v1 != nil {
		h.loadCheckpointRecords(r)
	}
	return h.Checkpoint()
}

// Checkpoint returns the current checkpoint payload held in memory (from
// Read, SetCheckpoint or SaveCheckpoint), or ErrNoCheckpoint.
func (h *Header) Checkpoint() ([]byte, error) {
	if h.v1 != nil {
		if !h.ckptValid {
			return nil, ErrNoCheckpoint
		}
		return slices.Clone(h.ckptPayload), nil
	}
	_, t := h.dmconvertToken()
	if t == nil {
		return nil, ErrNoCheckpoint
	}
	return decodeCheckpointToken(t)
}

// CheckpointRecord returns where the current LUKS1 checkpoint record goes
// and its bytes: what Image holds there, without building the whole
// image (a checkpoint is written once a second during a run).
func (h *Header) CheckpointRecord() (int64, []byte, error) {
	area, err := h.CheckpointArea()
	if err != nil {
		return 0, nil, err
	}
	if !h.ckptValid {
		return 0, nil, ErrNoCheckpoint
	}
	off := area + int64(h.ckptSeq%2)*CheckpointRecordSize
	return off, encodeCheckpointRecord(h.ckptSeq, h.ckptPayload), nil
}

// CheckpointSeq returns the LUKS1 record sequence number of the current
// checkpoint (LUKS2: the metadata sequence id).
func (h *Header) CheckpointSeq() uint64 {
	if h.v1 != nil {
		return h.ckptSeq
	}
	return h.v2.seqid
}

// SetCheckpoint sets the checkpoint in memory: for LUKS2 it creates or
// replaces the dmconvert token (written by the next WriteMetadata, Commit
// or Image); for LUKS1 it becomes the next record (sequence number + 1),
// which Image includes. Use SaveCheckpoint to write it at once.
func (h *Header) SetCheckpoint(payload []byte) error {
	if h.v1 != nil {
		if len(payload) > CheckpointPayloadMax {
			return fmt.Errorf("LUKS1 checkpoint payload %d bytes (max %d): %w", len(payload), CheckpointPayloadMax, ErrNoSpace)
		}
		if _, err := h.CheckpointArea(); err != nil {
			return err
		}
		h.ckptSeq++
		h.ckptPayload, h.ckptValid = slices.Clone(payload), true
		return nil
	}
	id, _ := h.dmconvertToken()
	_, err := h.SetToken(id, encodeCheckpointToken(payload))
	return err
}

// RemoveCheckpoint drops the checkpoint in memory (LUKS2: the token;
// LUKS1: Image then writes zero records).
func (h *Header) RemoveCheckpoint() {
	if h.v1 != nil {
		h.ckptPayload, h.ckptValid = nil, false
		return
	}
	if id, _ := h.dmconvertToken(); id >= 0 {
		_ = h.RemoveToken(id)
	}
}

// SaveCheckpoint durably records payload: LUKS2 sets the token and calls
// WriteMetadata (both metadata copies, seqid+1, keyslot area untouched);
// LUKS1 writes one 512-byte record with the next sequence number into the
// slot not holding the current one, then syncs if w can.
func (h *Header) SaveCheckpoint(w io.WriterAt, payload []byte) error {
	if err := h.SetCheckpoint(payload); err != nil {
		return err
	}
	if h.v2 != nil {
		return h.WriteMetadata(w)
	}
	area, _ := h.CheckpointArea()
	off := area + int64(h.ckptSeq%2)*CheckpointRecordSize
	if err := writeFull(w, encodeCheckpointRecord(h.ckptSeq, h.ckptPayload), off); err != nil {
		return err
	}
	return syncIfPossible(w)
}

// WipeCheckpointRecords zeroes both LUKS1 checkpoint records on w.
func (h *Header) WipeCheckpointRecords(w io.WriterAt) error {
	area, err := h.CheckpointArea()
	if err != nil {
		return err
	}
	h.ckptPayload, h.ckptValid = nil, false
	if err := writeFull(w, make([]byte, 2*CheckpointRecordSize), area); err != nil {
		return err
	}
	return syncIfPossible(w)
}

// SetDisguised marks a LUKS1 header as in progress (magic
// "DMCVT\xba\xbe", see DisguisedMagic) or not, in memory. It refuses to
// disguise a header without checkpoint room.
func (h *Header) SetDisguised(on bool) error {
	if h.v1 == nil {
		return fmt.Errorf("the disguised magic is LUKS1 only (LUKS2 uses the %q requirement): %w", RequirementDmconvert, ErrUnsupported)
	}
	if on {
		if err := h.CheckCheckpointRoom(); err != nil {
			return err
		}
	} else if h.v1.staged != nil {
		return fmt.Errorf("keyslots %v hold a staged rekey key: bind or drop it before the header is revealed: %w", h.v1.staged.slots, ErrInvalidArgument)
	}
	h.v1.disguised = on
	return nil
}

// Reveal turns a disguised LUKS1 header on w back into a standard one by
// rewriting only its first block (the phdr with the real magic) and
// syncing. The keyslot material and checkpoint records are not touched.
func (h *Header) Reveal(w io.WriterAt) error {
	if h.v1 == nil {
		return fmt.Errorf("reveal is LUKS1 only: %w", ErrUnsupported)
	}
	if h.v1.staged != nil {
		return fmt.Errorf("keyslots %v hold a staged rekey key: bind or drop it before the header is revealed: %w", h.v1.staged.slots, ErrInvalidArgument)
	}
	h.v1.disguised = false
	b, err := h.FirstBlock()
	if err != nil {
		return err
	}
	n := FirstBlockSize
	if first := h.firstMaterialOffset(); first < int64(n) {
		n = luks1PhdrPadded
	}
	if err := writeFull(w, b[:n], 0); err != nil {
		return err
	}
	return syncIfPossible(w)
}

func (h *Header) firstMaterialOffset() int64 {
	first := int64(-1)
	for _, s := range h.v1.slots {
		if o := int64(s.offset) * sectorSize; first < 0 || o < first {
			first = o
		}
	}
	return first
}
