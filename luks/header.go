package luks

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
)

// Header is a parsed or newly created LUKS1 or LUKS2 header, held
// entirely in memory (metadata and keyslot material). Changes are made in
// memory and reach a device only through Image, WriteHeader, Commit,
// WriteMetadata, SaveCheckpoint or Reveal, so the caller controls every
// write and its ordering.
type Header struct {
	v1 *luks1
	v2 *luks2

	// LUKS1 dmconvert checkpoint state (see checkpoint.go).
	ckptSeq     uint64
	ckptPayload []byte
	ckptValid   bool

	// pending keyslot area writes, applied by Commit
	dirtyBefore []span // written before the metadata (new material)
	dirtyAfter  []span // written after the metadata (wipes of removed slots)
}

type span struct{ off, size int64 }

// Read parses the LUKS header at the start of r: LUKS1, LUKS1 disguised
// by a dmconvert run, or LUKS2 (both copies are read and checked; the
// valid copy with the higher sequence id wins, and Copies reports what
// was wrong with the other). The keyslot material is loaded too.
func Read(r io.ReaderAt) (*Header, error) {
	first, err := readAt(r, 0, luks2BinSize)
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("input shorter than a header: %w", ErrNotLUKS)
		}
		return nil, fmt.Errorf("reading header: %w", err)
	}
	if _, err := decodePhdr1(first); err == nil {
		l1, err := readLUKS1(r, first)
		if err != nil {
			return nil, err
		}
		h := &Header{v1: l1}
		h.loadCheckpointRecords(r)
		return h, nil
	} else if errors.Is(err, ErrCorrupt) {
		// A disguised LUKS1 header with a damaged staged-key record.
		return nil, err
	}
	l2, err := readLUKS2(r)
	if err != nil {
		return nil, err
	}
	return &Header{v2: l2}, nil
}

// ReadFile reads the header at the start of a file or block device.
func ReadFile(path string) (*Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h, err := Read(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return h, nil
}

// Version returns 1 or 2.
func (h *Header) Version() int {
	if h.v1 != nil {
		return 1
	}
	return 2
}

// UUID returns the header UUID.
func (h *Header) UUID() string {
	if h.v1 != nil {
		return h.v1.uuid
	}
	return h.v2.uuid
}

// Label returns the LUKS2 label ("" for LUKS1).
func (h *Header) Label() string {
	if h.v2 != nil {
		return h.v2.label
	}
	return ""
}

// Subsystem returns the LUKS2 subsystem ("" for LUKS1).
func (h *Header) Subsystem() string {
	if h.v2 != nil {
		return h.v2.subsystem
	}
	return ""
}

// SetLabel sets the LUKS2 label and subsystem (at most 47 bytes each).
func (h *Header) SetLabel(label, subsystem string) error {
	if h.v2 == nil {
		return fmt.Errorf("labels need LUKS2: %w", ErrUnsupported)
	}
	if err := checkLabel(label, "label"); err != nil {
		return err
	}
	if err := checkLabel(subsystem, "subsystem"); err != nil {
		return err
	}
	h.v2.label, h.v2.subsystem = label, subsystem
	return nil
}

// Cipher returns the data cipher spec, e.g. "aes-xts-plain64".
func (h *Header) Cipher() string {
	if h.v1 != nil {
		return h.v1.cipherName + "-" + h.v1.cipherMode
	}
	if s, err := h.v2.dataSegment(); err == nil {
		return s.encryption
	}
	return ""
}

// VolumeKeySize returns the size in bytes of the data segment's key.
func (h *Header) VolumeKeySize() int {
	if h.v1 != nil {
		return int(h.v1.keyBytes)
	}
	d, _, err := h.v2.segmentDigest()
	if err != nil {
		return 0
	}
	for _, id := range d.keyslots {
		if k, err := h.v2.keyslot(id); err == nil {
			return k.keySize
		}
	}
	return 0
}

// SectorSize returns the encryption sector size in bytes (always 512 for
// LUKS1).
func (h *Header) SectorSize() int {
	if h.v1 != nil {
		return sectorSize
	}
	if s, err := h.v2.dataSegment(); err == nil {
		return s.sectorSize
	}
	return 0
}

// DataOffset returns the byte offset of the encrypted data (0 for a
// detached header).
func (h *Header) DataOffset() int64 {
	if h.v1 != nil {
		return int64(h.v1.payloadOffset) * sectorSize
	}
	if s, err := h.v2.dataSegment(); err == nil {
		return int64(s.offset)
	}
	return 0
}

// HeaderSize returns the size of the header area in bytes: the data
// offset, or, for a detached header, the end of the keyslot material.
// Image returns exactly this many bytes.
func (h *Header) HeaderSize() int64 {
	if off := h.DataOffset(); off != 0 {
		return off
	}
	if h.v1 != nil {
		return int64(alignUp(h.v1.materialEnd(), luks1AlignKeyslot))
	}
	ksz, _ := h.v2.keyslotsSize()
	return int64(2*h.v2.hdrSize + ksz)
}

// MetadataSize returns the LUKS2 size of one metadata copy (binary header
// plus JSON area), 0 for LUKS1.
func (h *Header) MetadataSize() int64 {
	if h.v2 != nil {
		return int64(h.v2.hdrSize)
	}
	return 0
}

// KeyslotsSize returns the LUKS2 keyslots area size (LUKS1: the bytes from
// the first keyslot to the end of the keyslot material).
func (h *Header) KeyslotsSize() int64 {
	if h.v2 != nil {
		n, _ := h.v2.keyslotsSize()
		return int64(n)
	}
	return int64(h.v1.materialEnd()) - luks1AlignKeyslot
}

// SeqID returns the LUKS2 metadata sequence id (0 for LUKS1).
func (h *Header) SeqID() uint64 {
	if h.v2 != nil {
		return h.v2.seqid
	}
	return 0
}

// Copies reports the state of the two LUKS2 metadata copies as found by
// Read (zero values for LUKS1 and for headers built by Create). A copy
// with Valid false or a non-nil Err was damaged or stale; the next
// WriteMetadata or Commit rewrites both.
func (h *Header) Copies() [2]CopyStatus {
	if h.v2 != nil {
		return h.v2.copies
	}
	return [2]CopyStatus{}
}

// Disguised reports whether a LUKS1 header carries the dmconvert
// in-progress magic instead of the LUKS magic.
func (h *Header) Disguised() bool { return h.v1 != nil && h.v1.disguised }

// Keyslot describes one active keyslot.
type Keyslot struct {
	ID         int
	Type       string // "luks2" for LUKS2 keyslots, "luks1" for LUKS1 ones
	Bound      bool   // its key is the data segment's volume key
	Digest     int    // LUKS2 digest id (-1 for LUKS1 or none)
	KeySize    int    // bytes of the stored key
	Cipher     string // keyslot area encryption
	AreaKey    int    // bytes of the keyslot area key (LUKS1: the volume key's)
	PBKDF      PBKDF  // Type, Hash, Iterations (argon2: time), MemoryKiB, Parallel
	AFHash     string
	AreaOffset int64 // bytes from the start of the device
	AreaSize   int64
	Priority   int // LUKS2: 0 ignore, 1 normal, 2 prefer; LUKS1: 1
}

// Keyslots lists the active keyslots in id order.
func (h *Header) Keyslots() []Keyslot {
	var out []Keyslot
	if h.v1 != nil {
		for i, s := range h.v1.slots {
			// A rekey's staged key (rekey1.go) is disabled in the phdr;
			// it is listed as an unbound keyslot.
			staged := h.v1.isStaged(i)
			if s.active != luks1KeyEnabled && !staged {
				continue
			}
			cs, kb, off, n, _ := h.v1.slotGeom(i)
			out = append(out, Keyslot{ID: i, Type: "luks1", Bound: !staged, Digest: -1,
				KeySize: int(kb), Cipher: cs.String(), AreaKey: int(kb),
				PBKDF:  PBKDF{Type: KDFPBKDF2, Hash: h.v1.hashSpec, Iterations: s.iterations},
				AFHash: h.v1.hashSpec, AreaOffset: int64(off) * sectorSize,
				AreaSize: int64(n) * sectorSize, Priority: 1})
		}
		return out
	}
	seg, _ := h.v2.dataSegment()
	for _, id := range h.v2.activeKeyslots() {
		k, err := h.v2.keyslot(id)
		if err != nil {
			continue
		}
		ks := Keyslot{ID: id, Type: k.typ, Digest: -1, KeySize: k.keySize, Cipher: k.areaEnc, AreaKey: k.areaKeySize,
			PBKDF: PBKDF{Type: k.kdf.typ, Hash: k.kdf.hash, Iterations: k.kdf.iterations,
				MemoryKiB: k.kdf.memory, Parallel: k.kdf.parallel},
			AFHash: k.afHash, AreaOffset: int64(k.areaOffset), AreaSize: int64(k.areaSize), Priority: k.priority}
		if d, err := h.v2.digestOfKeyslot(id); err == nil {
			ks.Digest = d.id
			ks.Bound = seg != nil && slices.Contains(d.segments, seg.id)
		}
		out = append(out, ks)
	}
	return out
}

// Unlock opens the first keyslot bound to the data segment that accepts
// key (a passphrase or key file contents), trying LUKS2 keyslots with
// priority "prefer" first and skipping priority "ignore", as cryptsetup
// does, and returns the verified volume key and the keyslot id. It fails
// with ErrWrongPassphrase when no keyslot accepts the key.
func (h *Header) Unlock(key []byte) (*VolumeKey, int, error) {
	return h.unlock(key, true)
}

// UnlockUnbound is Unlock over the LUKS2 keyslots that are not bound to
// the data segment (cryptsetup's --unbound keyslots), or, for LUKS1, opens
// the key a dmconvert rekey staged (rekey1.go).
func (h *Header) UnlockUnbound(key []byte) (*VolumeKey, int, error) {
	if h.v1 != nil {
		return h.unlockStaged1(key)
	}
	return h.unlock(key, false)
}

func (h *Header) unlock(key []byte, bound bool) (*VolumeKey, int, error) {
	var cands []int
	if h.v1 != nil {
		for i, s := range h.v1.slots {
			if s.active == luks1KeyEnabled {
				cands = append(cands, i)
			}
		}
	} else {
		var pref, normal []int
		for _, ks := range h.Keyslots() {
			if ks.Bound != bound || ks.Type != "luks2" || ks.Digest < 0 {
				continue
			}
			switch ks.Priority {
			case 2:
				pref = append(pref, ks.ID)
			case 1:
				normal = append(normal, ks.ID)
			}
		}
		cands = append(pref, normal...)
	}
	if len(cands) == 0 {
		return nil, -1, fmt.Errorf("header %s: %w", h.UUID(), ErrNoKeyslot)
	}
	// Every candidate is tried. The result is ErrWrongPassphrase if any
	// keyslot could be evaluated and rejected the key; only when none
	// could be evaluated at all (unsupported cipher, damaged keyslot) is
	// that error returned instead.
	var firstErr error
	wrong := false
	for _, id := range cands {
		vk, err := h.UnlockSlot(id, key)
		if err == nil {
			return vk, id, nil
		}
		if errors.Is(err, ErrWrongPassphrase) {
			wrong = true
		} else if firstErr == nil {
			firstErr = err
		}
	}
	if !wrong && firstErr != nil {
		return nil, -1, fmt.Errorf("header %s: %w", h.UUID(), firstErr)
	}
	return nil, -1, fmt.Errorf("header %s: %w", h.UUID(), ErrWrongPassphrase)
}

// UnlockSlot opens one keyslot (bound or unbound) and returns its key
// after verifying it against the keyslot's digest.
func (h *Header) UnlockSlot(slot int, key []byte) (*VolumeKey, error) {
	if h.v1 != nil {
		if slot < 0 || slot >= luks1NumKeys {
			return nil, fmt.Errorf("keyslot %d: %w", slot, ErrInvalidArgument)
		}
		k, err := h.v1.openSlot(slot, key)
		if err != nil {
			return nil, err
		}
		ok, err := h.v1.verifyKey(k)
		if err != nil || !ok {
			wipe(k)
			if err != nil {
				return nil, err
			}
			return nil, fmt.Errorf("keyslot %d: %w", slot, ErrWrongPassphrase)
		}
		vk := NewVolumeKeyFromBytes(k)
		wipe(k)
		return vk, nil
	}
	ks, err := h.v2.keyslot(slot)
	if err != nil {
		return nil, err
	}
	d, err := h.v2.digestOfKeyslot(slot)
	if err != nil {
		return nil, err
	}
	k, err := h.v2.openKeyslot(ks, key)
	if err != nil {
		return nil, err
	}
	ok, err := d.verify(k)
	if err != nil || !ok {
		wipe(k)
		if err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("keyslot %d: %w", slot, ErrWrongPassphrase)
	}
	vk := NewVolumeKeyFromBytes(k)
	wipe(k)
	return vk, nil
}

// VerifyVolumeKey checks vk against the data segment's digest.
func (h *Header) VerifyVolumeKey(vk *VolumeKey) error {
	var ok bool
	var err error
	if h.v1 != nil {
		if vk.Len() != int(h.v1.keyBytes) {
			return fmt.Errorf("%d-byte key for a %d-byte header key: %w", vk.Len(), h.v1.keyBytes, ErrWrongKey)
		}
		ok, err = h.v1.verifyKey(vk.Bytes())
	} else {
		d, _, derr := h.v2.segmentDigest()
		if derr != nil {
			return derr
		}
		ok, err = d.verify(vk.Bytes())
	}
	if err != nil {
		return err
	}
	if !ok {
		return ErrWrongKey
	}
	return nil
}

// Requirement names.
const (
	// RequirementDmconvert is the LUKS2 mandatory requirement dmconvert
	// sets while a conversion is in progress; cryptsetup refuses to open
	// (and to restore a backup of) a header carrying an unknown
	// mandatory requirement.
	RequirementDmconvert = "dmconvert"
	// TokenTypeDmconvert is the LUKS2 token type holding the checkpoint.
	TokenTypeDmconvert = "dmconvert"
)

// Requirements returns config.requirements.mandatory (LUKS2).
func (h *Header) Requirements() []string {
	if h.v2 == nil {
		return nil
	}
	req, _ := h.v2.sec("config").getObject("requirements")
	if req == nil {
		return nil
	}
	raw, ok := req.get("mandatory")
	if !ok {
		return nil
	}
	a, _ := stringArray(raw)
	return a
}

// SetRequirement adds name to the LUKS2 mandatory requirements (in
// memory; idempotent).
func (h *Header) SetRequirement(name string) error {
	if h.v2 == nil {
		return fmt.Errorf("requirements need LUKS2 (LUKS1 uses the disguised magic): %w", ErrUnsupported)
	}
	if name == "" {
		return fmt.Errorf("empty requirement: %w", ErrInvalidArgument)
	}
	reqs := h.Requirements()
	if slices.Contains(reqs, name) {
		return nil
	}
	return h.setRequirements(append(reqs, name))
}

// ClearRequirement removes name from the LUKS2 mandatory requirements,
// dropping the empty array and object as cryptsetup does.
func (h *Header) ClearRequirement(name string) error {
	if h.v2 == nil {
		return fmt.Errorf("requirements need LUKS2: %w", ErrUnsupported)
	}
	reqs := slices.DeleteFunc(h.Requirements(), func(s string) bool { return s == name })
	return h.setRequirements(reqs)
}

func (h *Header) setRequirements(reqs []string) error {
	config := h.v2.sec("config")
	req, err := config.getObject("requirements")
	if err != nil {
		return corruptf("config requirements: %v", err)
	}
	if req == nil {
		req = newObject()
	}
	if len(reqs) == 0 {
		req.del("mandatory")
	} else {
		req.set("mandatory", jsonRaw(reqs))
	}
	if req.len() == 0 {
		config.del("requirements")
	} else {
		config.setObject("requirements", req)
	}
	h.v2.setSec("config", config)
	return nil
}

// TokenIDs lists the LUKS2 token ids in ascending order.
func (h *Header) TokenIDs() []int {
	if h.v2 == nil {
		return nil
	}
	ids, _ := h.v2.sec("tokens").numericKeys()
	return ids
}

// Token returns the raw JSON of a LUKS2 token exactly as stored
// (compacted), or false if there is none.
func (h *Header) Token(id int) ([]byte, bool) {
	if h.v2 == nil {
		return nil, false
	}
	raw, ok := h.v2.sec("tokens").get(strconv.Itoa(id))
	if !ok {
		return nil, false
	}
	return slices.Clone(raw), true
}

// SetToken stores a LUKS2 token (any type) at id, or at the lowest free
// id if id < 0, and returns the id. The JSON must be an object with a
// non-empty string "type" and a "keyslots" array naming active keyslots;
// every other member is kept as given.
func (h *Header) SetToken(id int, tokenJSON []byte) (int, error) {
	if h.v2 == nil {
		return -1, fmt.Errorf("tokens need LUKS2: %w", ErrUnsupported)
	}
	t, err := parseObject(tokenJSON)
	if err != nil {
		return -1, fmt.Errorf("token JSON: %v: %w", err, ErrInvalidArgument)
	}
	if _, err := needString(t, "type", "token"); err != nil {
		return -1, fmt.Errorf("%v: %w", err, ErrInvalidArgument)
	}
	if _, err := refArray(t, "keyslots", "token", h.v2.sec("keyslots")); err != nil {
		return -1, fmt.Errorf("%v: %w", err, ErrInvalidArgument)
	}
	tokens := h.v2.sec("tokens")
	if id < 0 {
		var ok bool
		if id, ok = freeID(tokens, luks2MaxObjects); !ok {
			return -1, fmt.Errorf("all %d token ids in use: %w", luks2MaxObjects, ErrNoSpace)
		}
	} else if id >= luks2MaxObjects {
		return -1, fmt.Errorf("token id %d: %w", id, ErrInvalidArgument)
	}
	tokens.setObject(strconv.Itoa(id), t)
	return id, h.commitSection("tokens", tokens)
}

// RemoveToken deletes a LUKS2 token.
func (h *Header) RemoveToken(id int) error {
	if h.v2 == nil {
		return fmt.Errorf("tokens need LUKS2: %w", ErrUnsupported)
	}
	tokens := h.v2.sec("tokens")
	tokens.del(strconv.Itoa(id))
	h.v2.setSec("tokens", tokens)
	return nil
}

// commitSection stores a changed section and checks the JSON still fits.
func (h *Header) commitSection(name string, o *object) error {
	old, _ := h.v2.root.get(name)
	h.v2.setSec(name, o)
	if _, err := h.v2.jsonText(); err != nil {
		h.v2.root.set(name, old)
		return err
	}
	return nil
}

// dmconvertToken finds the token of type dmconvert.
func (h *Header) dmconvertToken() (int, *object) {
	tokens := h.v2.sec("tokens")
	ids, _ := tokens.numericKeys()
	for _, id := range ids {
		t, err := tokens.getObject(strconv.Itoa(id))
		if err != nil || t == nil {
			continue
		}
		if typ, _ := needString(t, "type", "token"); typ == TokenTypeDmconvert {
			return id, t
		}
	}
	return -1, nil
}

// encodeCheckpointToken builds {"type":"dmconvert","keyslots":[],
// "checkpoint":"<base64 payload>"}.
func encodeCheckpointToken(payload []byte) []byte {
	t := newObject()
	t.set("type", jsonRaw(TokenTypeDmconvert))
	t.set("keyslots", jsonRaw([]string{}))
	t.set("checkpoint", jsonRaw(base64.StdEncoding.EncodeToString(payload)))
	return t.marshal()
}

func decodeCheckpointToken(t *object) ([]byte, error) {
	s, err := needString(t, "checkpoint", "dmconvert token")
	if err != nil {
		if raw, ok := t.get("checkpoint"); ok && string(raw) == `""` {
			return []byte{}, nil
		}
		return nil, err
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, corruptf("dmconvert token checkpoint is not base64")
	}
	return b, nil
}
