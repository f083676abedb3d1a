package convert

import (
	"encoding/json"
	"fmt"
	"io"
)

// Checkpoint is the on-disk record of a run's position, kept in the
// header (a LUKS2 token of type "dmconvert", or LUKS1's checkpoint
// records). It lets resume find the run and its position from the disk
// alone, and it backs up the journal: resume takes the furthest of the two.
type Checkpoint struct {
	Run      string  `json:"run"`
	Op       string  `json:"op"`
	Plan     string  `json:"plan"` // "forward" or "abort"
	Phase    int     `json:"phase"`
	Boundary Sectors `json:"boundary"`
	Journal  string  `json:"journal,omitempty"`
}

// Write is a piece of the header region to write at Off (bytes). Flush
// asks for the disk's cache to be flushed after it, before the next write
// (so that a torn sequence always leaves one valid copy).
type Write struct {
	Off   int64
	Data  []byte
	Flush bool
}

// HeaderFormat is the engine's view of the LUKS header it writes: the
// in-progress image, per-step checkpoint updates and the final form. The
// luks package implements it (luksheader.go); tests may fake it.
type HeaderFormat interface {
	// Sectors is the header size H.
	Sectors() Sectors
	// Image is the whole header region, marked in progress (LUKS2
	// mandatory requirement "dmconvert", or LUKS1's disguised magic),
	// carrying cp.
	Image(cp Checkpoint) ([]byte, error)
	// CheckpointWrites are the writes that record cp in a header already
	// on disk. They never touch keyslot material.
	CheckpointWrites(cp Checkpoint) ([]Write, error)
	// FinalWrites turn the in-progress header on disk into a plain LUKS
	// header that stock cryptsetup opens: as it is (encrypt, and aborts
	// back to it), or switched to the rekey's new key and data offset.
	FinalWrites(f Final) ([]Write, error)
	// MarkWrites mark a plain header already on disk as in progress
	// (requirement and token, or LUKS1's disguised magic and a record),
	// carrying cp: the first writes of a decrypt or rekey.
	MarkWrites(cp Checkpoint) ([]Write, error)
	// ReadCheckpoint reads the checkpoint from a header on disk.
	ReadCheckpoint(r io.ReaderAt) (Checkpoint, bool, error)
	// UUID of the LUKS header (for crypttab and the dm UUID).
	UUID() string
	// Version is 1 or 2.
	Version() int
	// Crypt is how the data area is encrypted (cipher, key size, sector
	// size), as cryptsetup would map it.
	Crypt() CryptSpec
}

// Final says how a run ends its header.
type Final struct {
	// Rekey: bind the data segment to the unbound keyslot's key, remove
	// every keyslot of the old key, and move the data offset.
	Rekey      bool
	DataOffset Sectors
	// Cipher is the data segment's cipher spec from then on (the new
	// key's, from the run's plan); empty keeps the header's.
	Cipher string
	// DropUnbound: remove the unbound keyslot (an aborted rekey).
	DropUnbound bool
	// Keyslots maps each keyslot holding the new key to the old keyslot
	// whose number it takes (a LUKS2 rekey; Spec.KeyslotIDs).
	Keyslots map[int]int
}

func marshalCheckpoint(cp Checkpoint) ([]byte, error) { return json.Marshal(cp) }

func unmarshalCheckpoint(b []byte) (Checkpoint, error) {
	var cp Checkpoint
	if err := json.Unmarshal(b, &cp); err != nil {
		return cp, fmt.Errorf("checkpoint record: %w", err)
	}
	return cp, nil
}
