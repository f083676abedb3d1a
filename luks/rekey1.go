package luks

import (
	"bytes"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"slices"

	"golang.org/x/crypto/pbkdf2"
)

// A dmconvert rekey of a LUKS1 header (docs/design.md section 8, "LUKS1").
//
// LUKS1 has one volume key digest and no unbound keyslots, so while a
// rekey runs the new key is *staged*: its AF-split material is written to
// a keyslot that is not in use, encrypted like any keyslot (the header's
// cipher, PBKDF2 with the header's hash and the iteration count of the
// keyslot the passphrase opened), and the keyslot stays DISABLED in the
// phdr, so that a header read without knowing of the rekey simply has one
// more free keyslot. What makes it a staged key is a record in the
// padding after the phdr's fields (bytes [592,664), which cryptsetup never
// reads and zeroes in its backups), written only into a disguised header
// (DisguisedMagic: cryptsetup does not recognise the header at all):
//
//	[0,8)    magic "DMCVTRK1"
//	[8,12)   the staged keyslot, big-endian
//	         (magic "DMCVTRK2": a bit mask of the staged keyslots, bit i
//	         for keyslot i, when the new key waits in several: one per
//	         passphrase a rekey keeps)
//	[12,16)  the new key's digest iterations
//	[16,36)  the new key's digest (PBKDF2 of the key, as the MK digest)
//	[36,68)  the digest's salt
//	[68,72)  CRC32C (Castagnoli) of [0,68)
//
// A rekey to another cipher or key size (magic "DMCVTRK3", always a mask)
// has a longer record: [68,100) the new cipher name, [100,132) its mode,
// [132,136) the new key's size in bytes, [136,140) CRC32C of [0,136). Its
// staged keyslots are encrypted with the new cipher and key size, and
// their material lies where the new key size's layout (cryptsetup's)
// puts those keyslots, clear of every keyslot in use and of the
// checkpoint records; their phdr entries keep the old offsets until the
// switch, which moves every keyslot to the new layout (see respec1).
//
// While a key is staged, the checkpoint records move from the last 4 KiB
// of the header area (where the data is about to move) to the first
// 4 KiB-aligned offset after the keyslot material. BindSegmentCipher
// makes the staged key the volume key (digest replaced, keyslot enabled);
// RemoveKeyslot of the staged keyslot drops it.

const (
	l1OffStaged     = l1OffKeyblock + luks1NumKeys*l1KeyblockSize // 592
	l1StagedSize    = 72
	l1StagedCRCAt   = 68
	l1RespecSize    = 140
	l1RespecCRCAt   = 136
	l1RespecOffName = 68
	l1RespecOffMode = 100
	l1RespecOffKey  = 132
)

var (
	stagedMagic       = []byte("DMCVTRK1")
	stagedMaskMagic   = []byte("DMCVTRK2")
	stagedRespecMagic = []byte("DMCVTRK3")
)

// respec1 is the new cipher and key size of a LUKS1 rekey that changes
// them: the staged keyslots are encrypted with it, at the offsets of the
// new key size's keyslot layout.
type respec1 struct {
	cipherName, cipherMode string
	keyBytes               uint32
}

// cipher parses the new cipher.
func (r *respec1) cipher() (cipherSpec, error) {
	return parseCipherNameMode(r.cipherName, r.cipherMode)
}

// materialSectors is the size of a keyslot's material for the new key.
func (r *respec1) materialSectors() uint32 { return uint32(afSectors(int(r.keyBytes), luksStripes)) }

// offset is where cryptsetup's layout for the new key size puts keyslot
// i (sectors): after the phdr's 4 KiB, each keyslot's material rounded
// up to 4 KiB.
func (r *respec1) offset(i int) uint32 {
	stride := uint32(alignUp(uint64(r.materialSectors()), luks1AlignKeyslot/sectorSize))
	return luks1AlignKeyslot/sectorSize + uint32(i)*stride
}

// end is the end of the new layout's last keyslot (sectors).
func (r *respec1) end() uint32 { return r.offset(luks1NumKeys-1) + r.materialSectors() }

// staged1 is the new key of a LUKS1 rekey in progress.
type staged1 struct {
	// slots are the keyslots holding it, in increasing order: one per
	// passphrase the rekey keeps (a record names one keyslot when there
	// is one, a mask when there are several).
	slots  []int
	iter   uint32
	digest [luks1DigestSize]byte
	salt   [saltSize]byte
	// respec: the new cipher and key size (nil: the header's).
	respec *respec1
}

func (s *staged1) encode(b []byte) {
	size, crcAt := l1StagedSize, l1StagedCRCAt
	if s.respec != nil {
		size, crcAt = l1RespecSize, l1RespecCRCAt
	}
	r := b[:size]
	clear(r)
	switch {
	case s.respec == nil && len(s.slots) == 1:
		copy(r, stagedMagic)
		binary.BigEndian.PutUint32(r[8:], uint32(s.slots[0]))
	default:
		copy(r, stagedMaskMagic)
		if s.respec != nil {
			copy(r, stagedRespecMagic)
		}
		var m uint32
		for _, i := range s.slots {
			m |= 1 << i
		}
		binary.BigEndian.PutUint32(r[8:], m)
	}
	binary.BigEndian.PutUint32(r[12:], s.iter)
	copy(r[16:36], s.digest[:])
	copy(r[36:68], s.salt[:])
	if s.respec != nil {
		copy(r[l1RespecOffName:l1RespecOffName+31], s.respec.cipherName)
		copy(r[l1RespecOffMode:l1RespecOffMode+31], s.respec.cipherMode)
		binary.BigEndian.PutUint32(r[l1RespecOffKey:], s.respec.keyBytes)
	}
	binary.BigEndian.PutUint32(r[crcAt:], crc32.Checksum(r[:crcAt], castagnoli))
}

// decodeStaged1 reads the staged-key record of a disguised phdr: nil if
// there is none, an error if there is a damaged one.
func decodeStaged1(b []byte) (*staged1, error) {
	if len(b) < l1OffStaged+l1StagedSize {
		return nil, nil
	}
	r := b[l1OffStaged : l1OffStaged+l1StagedSize]
	respec := bytes.Equal(r[:8], stagedRespecMagic)
	mask := respec || bytes.Equal(r[:8], stagedMaskMagic)
	crcAt := l1StagedCRCAt
	switch {
	case respec && len(b) < l1OffStaged+l1RespecSize:
		return nil, corruptf("LUKS1 staged-key record cut short")
	case respec:
		r = b[l1OffStaged : l1OffStaged+l1RespecSize]
		crcAt = l1RespecCRCAt
	case !mask && !bytes.Equal(r[:8], stagedMagic):
		return nil, nil
	}
	if crc32.Checksum(r[:crcAt], castagnoli) != binary.BigEndian.Uint32(r[crcAt:]) {
		return nil, corruptf("LUKS1 staged-key record has a bad checksum")
	}
	s := &staged1{iter: binary.BigEndian.Uint32(r[12:])}
	if respec {
		s.respec = &respec1{cipherName: cstrFull(r[l1RespecOffName : l1RespecOffName+32]), cipherMode: cstrFull(r[l1RespecOffMode : l1RespecOffMode+32]),
			keyBytes: binary.BigEndian.Uint32(r[l1RespecOffKey:])}
		if _, err := s.respec.cipher(); err != nil {
			return nil, corruptf("LUKS1 staged-key record: %v", err)
		}
		if cs, _ := s.respec.cipher(); cs.checkKeySize(int(s.respec.keyBytes)) != nil {
			return nil, corruptf("LUKS1 staged-key record: a %d-byte key for %s", s.respec.keyBytes, cs)
		}
	}
	v := binary.BigEndian.Uint32(r[8:])
	switch {
	case !mask:
		s.slots = []int{int(v)}
	case v == 0 || v>>luks1NumKeys != 0:
		return nil, corruptf("LUKS1 staged-key record names keyslots %#x", v)
	default:
		for i := range luks1NumKeys {
			if v&(1<<i) != 0 {
				s.slots = append(s.slots, i)
			}
		}
	}
	copy(s.digest[:], r[16:36])
	copy(s.salt[:], r[36:68])
	return s, nil
}

// StagedKeyslot returns the first keyslot holding a LUKS1 rekey's staged
// key, or -1 (no staged key, or LUKS2, which uses unbound keyslots).
func (h *Header) StagedKeyslot() int {
	if h.v1 == nil || h.v1.staged == nil {
		return -1
	}
	return h.v1.staged.slots[0]
}

// StagedKeyslots returns every keyslot holding a LUKS1 rekey's staged
// key, in increasing order (nil: none, or LUKS2).
func (h *Header) StagedKeyslots() []int {
	if h.v1 == nil || h.v1.staged == nil {
		return nil
	}
	return slices.Clone(h.v1.staged.slots)
}

// isStaged reports whether keyslot i holds the staged key.
func (l *luks1) isStaged(i int) bool {
	return l.staged != nil && slices.Contains(l.staged.slots, i)
}

// stagedRecordsArea is where the checkpoint records live while a key is
// staged: the first 4 KiB boundary after the keyslot material.
func (l *luks1) stagedRecordsArea() int64 {
	return int64(alignUp(l.materialEnd(), checkpointRoom))
}

// stageKey1 stages vk for a rekey of a disguised LUKS1 header (see the
// top of this file): the first keyslot not in use gets vk's material,
// opened by key with p's iteration count, and stays disabled; the staged
// record holds vk's digest. Staged again (another passphrase the rekey
// keeps), the same key goes to one more free keyslot under the same
// digest; another key is refused. segmentCipher must be the header's cipher and
// vk the size of its key: LUKS1 has one of each for the data and every
// keyslot. In memory; the caller writes the material (Image shows it)
// before a phdr that names it.
func (h *Header) stageKey1(vk *VolumeKey, key []byte, p PBKDF, segmentCipher string) (int, error) {
	l := h.v1
	var respec *respec1
	if (segmentCipher != "" && segmentCipher != h.Cipher()) || vk.Len() != int(l.keyBytes) {
		spec := segmentCipher
		if spec == "" {
			spec = h.Cipher()
		}
		cs, err := parseCipher(spec)
		if err != nil {
			return -1, fmt.Errorf("a LUKS1 header encrypts its keyslots with the data's cipher, so the new cipher must be one dmconvert runs: %w", err)
		}
		if err := cs.checkKeySize(vk.Len()); err != nil {
			return -1, err
		}
		respec = &respec1{cipherName: cs.name, cipherMode: cs.mode, keyBytes: uint32(vk.Len())}
	}
	switch {
	case !l.disguised:
		return -1, fmt.Errorf("a LUKS1 header holds a staged key only while a dmconvert run disguises it: %w", ErrInvalidArgument)
	case l.staged != nil && (!l.staged.verify(l.hashSpec, vk.Bytes()) || (l.staged.respec == nil) != (respec == nil) ||
		respec != nil && *respec != *l.staged.respec):
		return -1, fmt.Errorf("keyslot %d already holds another staged key: %w", l.staged.slots[0], ErrInvalidArgument)
	case respec != nil && l.payloadOffset != 0 && respec.end() > l.payloadOffset:
		return -1, fmt.Errorf("the keyslots of a %d-bit key end at sector %d, after the data at %d: %w", vk.Len()*8, respec.end(), l.payloadOffset, ErrNoSpace)
	}
	if ok, err := l.verifyKey(vk.Bytes()); err != nil {
		return -1, err
	} else if ok {
		return -1, fmt.Errorf("the key to stage is the volume key already: %w", ErrInvalidArgument)
	}
	slot, err := l.freeSlot(&p)
	if err != nil {
		return -1, err
	}
	if respec != nil && slot >= 0 {
		slot = l.respecSlot(respec)
		if slot < 0 {
			return -1, fmt.Errorf("no free LUKS1 keyslot has its area for a %d-bit key clear of the keyslots in use (%v): remove one that is not needed, or convert to LUKS2 first: %w", vk.Len()*8, l.activeSlots(), ErrNoSpace)
		}
	}
	if slot < 0 {
		return -1, fmt.Errorf("all %d LUKS1 keyslots are in use, and the new key needs a free one until the rekey ends: %w", luks1NumKeys, ErrNoSpace)
	}
	if area := l.stagedRecordsArea(); area+checkpointRoom > int64(l.payloadOffset)*sectorSize {
		return -1, fmt.Errorf("LUKS1 keyslot material ends at %d bytes, leaving no 4 KiB for dmconvert's checkpoint records before the data at %d: %w",
			l.materialEnd(), int64(l.payloadOffset)*sectorSize, ErrNoSpace)
	}
	kdf, err := p.resolve(true, vk.Len())
	if err != nil {
		return -1, err
	}
	st := l.staged
	fresh := st == nil
	if fresh {
		st = &staged1{iter: l.mkIter, respec: respec}
		if err := fillRandom(st.salt[:]); err != nil {
			return -1, err
		}
		d, err := st.digestOf(l.hashSpec, vk.Bytes())
		if err != nil {
			return -1, err
		}
		copy(st.digest[:], d)
		l.staged = st
	}
	// The keyslot joins the staged ones first: its geometry (slotGeom)
	// is the new key's.
	st.slots = append(st.slots, slot)
	slices.Sort(st.slots)
	if err := l.setSlot(slot, vk.Bytes(), key, kdf); err != nil {
		st.slots = slices.DeleteFunc(st.slots, func(i int) bool { return i == slot })
		if fresh {
			l.staged = nil
		}
		return -1, err
	}
	l.slots[slot].active = luks1KeyDisabled
	return slot, nil
}

// respecSlot picks the keyslot for a staged key of another size or
// cipher: free, and with its area in the new key's layout clear of every
// keyslot in use, of the other staged ones, and of the checkpoint
// records (-1: none is).
func (l *luks1) respecSlot(r *respec1) int {
	recs := uint32(l.stagedRecordsArea() / sectorSize)
	used := [][2]uint32{{0, luks1AlignKeyslot / sectorSize}, {recs, recs + checkpointRoom/sectorSize}}
	for i, s := range l.slots {
		if s.active == luks1KeyEnabled {
			used = append(used, [2]uint32{s.offset, s.offset + l.materialSectors()})
		}
		if l.isStaged(i) {
			used = append(used, [2]uint32{r.offset(i), r.offset(i) + r.materialSectors()})
		}
	}
	for i, s := range l.slots {
		if s.active == luks1KeyEnabled || l.isStaged(i) {
			continue
		}
		a, b := r.offset(i), r.offset(i)+r.materialSectors()
		clear := true
		for _, u := range used {
			if a < u[1] && u[0] < b {
				clear = false
			}
		}
		if clear {
			return i
		}
	}
	return -1
}

// activeSlots lists the enabled keyslots.
func (l *luks1) activeSlots() []int {
	var out []int
	for i, s := range l.slots {
		if s.active == luks1KeyEnabled {
			out = append(out, i)
		}
	}
	return out
}

// slotGeom is how keyslot i's material is encrypted and where it lies:
// with the header's cipher and key size in its phdr area, or, for a
// staged key of another cipher or size, with those in the new layout.
func (l *luks1) slotGeom(i int) (cs cipherSpec, keyBytes, off, sectors uint32, err error) {
	if l.isStaged(i) && l.staged.respec != nil {
		r := l.staged.respec
		cs, err = r.cipher()
		return cs, r.keyBytes, r.offset(i), r.materialSectors(), err
	}
	cs, err = l.cipher()
	return cs, l.keyBytes, l.slots[i].offset, l.materialSectors(), err
}

// growBody extends the in-memory header area to end bytes (material the
// new layout puts beyond the old).
func (l *luks1) growBody(end uint64) {
	if uint64(len(l.body)) < end {
		l.body = append(l.body, make([]byte, end-uint64(len(l.body)))...)
	}
}

func fillRandom(b []byte) error {
	r, err := randomBytes(len(b))
	if err != nil {
		return err
	}
	copy(b, r)
	return nil
}

// verify reports whether k is the staged key (its digest matches).
func (st *staged1) verify(hashSpec string, k []byte) bool {
	got, err := st.digestOf(hashSpec, k)
	if err != nil {
		return false
	}
	defer wipe(got)
	return subtle.ConstantTimeCompare(got, st.digest[:]) == 1
}

// digestOf is the digest the record keeps for key k: PBKDF2 with the
// header's hash and the record's salt and iterations.
func (st *staged1) digestOf(hashSpec string, k []byte) ([]byte, error) {
	hf, err := hashByName(hashSpec)
	if err != nil {
		return nil, err
	}
	return pbkdf2.Key(k, st.salt[:], int(st.iter), luks1DigestSize, hf), nil
}

// unlockStaged1 opens the staged key of a LUKS1 rekey with key, trying
// each keyslot that holds it.
func (h *Header) unlockStaged1(key []byte) (*VolumeKey, int, error) {
	l := h.v1
	st := l.staged
	if st == nil {
		return nil, -1, fmt.Errorf("header %s holds no staged key: %w", h.UUID(), ErrNoKeyslot)
	}
	if _, err := hashByName(l.hashSpec); err != nil {
		return nil, -1, err
	}
	for _, slot := range st.slots {
		k, err := l.openSlotMaterial(slot, key)
		if err != nil {
			return nil, -1, err
		}
		if st.verify(l.hashSpec, k) {
			return NewVolumeKeyFromBytes(k), slot, nil
		}
		wipe(k)
	}
	return nil, -1, fmt.Errorf("header %s, staged keyslots %v: %w", h.UUID(), st.slots, ErrWrongPassphrase)
}

// bindStaged1 makes the staged key the volume key: its digest becomes the
// MK digest and every keyslot holding it is enabled. The other keyslots
// still hold the old key; the caller removes them.
func (h *Header) bindStaged1(slot int, cipher string) error {
	l := h.v1
	st := l.staged
	switch {
	case st == nil || !slices.Contains(st.slots, slot):
		return fmt.Errorf("keyslot %d holds no staged key: %w", slot, ErrNoKeyslot)
	case cipher != "" && cipher != h.Cipher() && (st.respec == nil || cipher != st.respec.cipherName+"-"+st.respec.cipherMode):
		return fmt.Errorf("the staged key is for cipher %s, not %s: %w", h.stagedCipher(), cipher, ErrInvalidArgument)
	}
	if r := st.respec; r != nil {
		// Every keyslot moves to the new key's layout, where the staged
		// ones already are. The old keyslots' material is overwritten
		// with random bytes after the phdr (none of it lies under a
		// staged keyslot: respecSlot), and the header takes the new
		// cipher and key size.
		for _, s := range l.slots {
			if s.active == luks1KeyEnabled {
				if err := h.wipeArea(s.offset, l.materialSectors()); err != nil {
					return err
				}
			}
		}
		l.cipherName, l.cipherMode, l.keyBytes = r.cipherName, r.cipherMode, r.keyBytes
		for i := range l.slots {
			l.slots[i].offset = r.offset(i)
		}
		l.growBody(l.materialEnd())
	}
	l.mkDigest, l.mkSalt, l.mkIter = st.digest, st.salt, st.iter
	for _, i := range st.slots {
		l.slots[i].active = luks1KeyEnabled
	}
	l.staged = nil
	return nil
}

// dropStaged1 drops keyslot slot of the staged key: the keyslot is
// cleared, its material overwritten with random bytes after the phdr
// (Commit). With the last one the staged key is forgotten.
func (h *Header) dropStaged1(slot int) error {
	l := h.v1
	if err := h.wipeSlot1(slot); err != nil {
		return err
	}
	l.staged.slots = slices.DeleteFunc(l.staged.slots, func(i int) bool { return i == slot })
	if len(l.staged.slots) == 0 {
		l.staged = nil
	}
	return nil
}

// wipeSlot1 clears a LUKS1 keyslot's KDF parameters and overwrites its
// material with random bytes, written after the phdr (Commit).
func (h *Header) wipeSlot1(slot int) error {
	l := h.v1
	_, _, off, n, err := l.slotGeom(slot)
	if err != nil {
		return err
	}
	s := &l.slots[slot]
	s.iterations, s.salt = 0, [saltSize]byte{}
	return h.wipeArea(off, n)
}

// wipeArea overwrites n sectors at off of the LUKS1 header area with
// random bytes, written after the phdr (Commit).
func (h *Header) wipeArea(off, n uint32) error {
	l := h.v1
	o, sz := int64(off)*sectorSize, int64(n)*sectorSize
	rnd, err := randomBytes(int(sz))
	if err != nil {
		return err
	}
	l.growBody(uint64(o + sz))
	copy(l.body[o:], rnd)
	h.dirtyAfter = append(h.dirtyAfter, span{o, sz})
	return nil
}

// stagedCipher is the cipher spec of the staged key (the header's unless
// it changes).
func (h *Header) stagedCipher() string {
	if st := h.v1.staged; st != nil && st.respec != nil {
		return st.respec.cipherName + "-" + st.respec.cipherMode
	}
	return h.Cipher()
}

// setDataOffset1 moves the LUKS1 payload to off bytes (a rekey's data
// moved toward the start of the device).
func (h *Header) setDataOffset1(off int64) error {
	l := h.v1
	switch {
	case l.staged != nil:
		return fmt.Errorf("the data offset of a header with a staged key cannot move: bind or drop the key first: %w", ErrInvalidArgument)
	case off <= 0 || off%sectorSize != 0 || off/sectorSize > 0xffffffff:
		return fmt.Errorf("data offset %d is not a positive multiple of %d: %w", off, sectorSize, ErrInvalidArgument)
	case off < int64(l.materialEnd()):
		return fmt.Errorf("data offset %d would cut keyslot material that ends at %d: %w", off, l.materialEnd(), ErrNoSpace)
	}
	l.payloadOffset = uint32(off / sectorSize)
	return nil
}
