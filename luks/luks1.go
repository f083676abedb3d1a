package luks

import (
	"bytes"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"io"

	"golang.org/x/crypto/pbkdf2"
)

// LUKS1 on-disk constants (LUKS1 On-Disk Format Specification 1.2.3,
// cryptsetup lib/luks1/luks.h). All integers are big-endian.
const (
	luks1PhdrSize     = 592  // the fields of the partition header
	luks1PhdrPadded   = 1024 // cryptsetup's struct luks_phdr incl. padding
	luks1NumKeys      = 8
	luks1DigestSize   = 20
	luks1KeyEnabled   = 0x00AC71F3
	luks1KeyDisabled  = 0x0000DEAD
	luks1AlignKeyslot = 4096

	l1OffCipherName = 8
	l1OffCipherMode = 40
	l1OffHashSpec   = 72
	l1OffPayload    = 104
	l1OffKeyBytes   = 108
	l1OffMKDigest   = 112
	l1OffMKSalt     = 132
	l1OffMKIter     = 164
	l1OffUUID       = 168
	l1OffKeyblock   = 208
	l1KeyblockSize  = 48
)

// DisguisedMagic is written over the first 7 bytes of a LUKS1 header
// while a dmconvert run is in progress. It replaces "LUKS\xba\xbe" and the
// high (zero) byte of the big-endian version field, so bytes [0,8) read
// "DMCVT\xba\xbe\x01"; neither cryptsetup nor blkid recognises it. Reveal
// restores "LUKS\xba\xbe\x00\x01".
var DisguisedMagic = []byte("DMCVT\xba\xbe")

type slot1 struct {
	active     uint32
	iterations uint32
	salt       [saltSize]byte
	offset     uint32 // sectors
	stripes    uint32
}

type luks1 struct {
	cipherName, cipherMode, hashSpec string
	payloadOffset                    uint32 // sectors
	keyBytes                         uint32
	mkDigest                         [luks1DigestSize]byte
	mkSalt                           [saltSize]byte
	mkIter                           uint32
	uuid                             string
	slots                            [luks1NumKeys]slot1
	// body holds bytes [0, materialEnd) of the header area; the first
	// luks1PhdrPadded bytes are re-encoded from the fields on output.
	body      []byte
	disguised bool
	// staged is a dmconvert rekey's new key (disguised headers only;
	// rekey1.go).
	staged *staged1
}

func cstrFull(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// decodePhdr1 parses the 592-byte header; disguised reports the magic.
func decodePhdr1(b []byte) (*luks1, error) {
	if len(b) < luks1PhdrSize {
		return nil, ErrNotLUKS
	}
	l := &luks1{}
	switch {
	case bytes.Equal(b[:6], magicLUKS) && binary.BigEndian.Uint16(b[offVersion:]) == 1:
	case bytes.Equal(b[:7], DisguisedMagic) && b[7] == 1:
		l.disguised = true
	default:
		return nil, ErrNotLUKS
	}
	l.cipherName = cstrFull(b[l1OffCipherName : l1OffCipherName+32])
	l.cipherMode = cstrFull(b[l1OffCipherMode : l1OffCipherMode+32])
	l.hashSpec = cstrFull(b[l1OffHashSpec : l1OffHashSpec+32])
	l.payloadOffset = binary.BigEndian.Uint32(b[l1OffPayload:])
	l.keyBytes = binary.BigEndian.Uint32(b[l1OffKeyBytes:])
	copy(l.mkDigest[:], b[l1OffMKDigest:])
	copy(l.mkSalt[:], b[l1OffMKSalt:])
	l.mkIter = binary.BigEndian.Uint32(b[l1OffMKIter:])
	l.uuid = cstrFull(b[l1OffUUID : l1OffUUID+40])
	if l.disguised {
		st, err := decodeStaged1(b)
		if err != nil {
			return nil, err
		}
		l.staged = st
	}
	for i := range l.slots {
		kb := b[l1OffKeyblock+i*l1KeyblockSize:]
		s := &l.slots[i]
		s.active = binary.BigEndian.Uint32(kb)
		s.iterations = binary.BigEndian.Uint32(kb[4:])
		copy(s.salt[:], kb[8:40])
		s.offset = binary.BigEndian.Uint32(kb[40:])
		s.stripes = binary.BigEndian.Uint32(kb[44:])
	}
	return l, nil
}

func (l *luks1) encodePhdr() []byte {
	b := make([]byte, luks1PhdrPadded)
	if l.disguised {
		copy(b, DisguisedMagic)
		b[7] = 1
	} else {
		copy(b, magicLUKS)
		binary.BigEndian.PutUint16(b[offVersion:], 1)
	}
	copy(b[l1OffCipherName:l1OffCipherName+31], l.cipherName)
	copy(b[l1OffCipherMode:l1OffCipherMode+31], l.cipherMode)
	copy(b[l1OffHashSpec:l1OffHashSpec+31], l.hashSpec)
	binary.BigEndian.PutUint32(b[l1OffPayload:], l.payloadOffset)
	binary.BigEndian.PutUint32(b[l1OffKeyBytes:], l.keyBytes)
	copy(b[l1OffMKDigest:], l.mkDigest[:])
	copy(b[l1OffMKSalt:], l.mkSalt[:])
	binary.BigEndian.PutUint32(b[l1OffMKIter:], l.mkIter)
	copy(b[l1OffUUID:l1OffUUID+39], l.uuid)
	for i, s := range l.slots {
		kb := b[l1OffKeyblock+i*l1KeyblockSize:]
		binary.BigEndian.PutUint32(kb, s.active)
		binary.BigEndian.PutUint32(kb[4:], s.iterations)
		copy(kb[8:40], s.salt[:])
		binary.BigEndian.PutUint32(kb[40:], s.offset)
		binary.BigEndian.PutUint32(kb[44:], s.stripes)
	}
	if l.disguised && l.staged != nil {
		l.staged.encode(b[l1OffStaged:])
	}
	return b
}

func (l *luks1) materialSectors() uint32 { return uint32(afSectors(int(l.keyBytes), luksStripes)) }

// materialEnd is the end of the last keyslot's material in bytes
// (cryptsetup's LUKS_device_sectors).
func (l *luks1) materialEnd() uint64 {
	var end uint64
	for _, s := range l.slots {
		end = max(end, uint64(s.offset)+uint64(l.materialSectors()))
	}
	return end * sectorSize
}

// validate mirrors cryptsetup's LUKS_check_keyslots and header checks.
func (l *luks1) validate() error {
	if l.keyBytes == 0 || l.keyBytes > MaxVolumeKeySize {
		return corruptf("LUKS1 key size %d bytes", l.keyBytes)
	}
	if _, err := hashByName(l.hashSpec); err != nil {
		return err
	}
	if l.mkIter == 0 {
		return corruptf("LUKS1 digest iterations 0")
	}
	ms := l.materialSectors()
	for i, s := range l.slots {
		if s.stripes != luksStripes {
			return corruptf("LUKS1 keyslot %d has %d stripes", i, s.stripes)
		}
		if s.active != luks1KeyEnabled && s.active != luks1KeyDisabled {
			return corruptf("LUKS1 keyslot %d state 0x%08x", i, s.active)
		}
		if uint64(s.offset)*sectorSize < luks1PhdrPadded {
			return corruptf("LUKS1 keyslot %d offset %d overlaps the header", i, s.offset)
		}
		if l.payloadOffset != 0 && uint64(l.payloadOffset) < uint64(s.offset)+uint64(ms) {
			return corruptf("LUKS1 keyslot %d material reaches beyond the payload offset", i)
		}
		if s.active == luks1KeyEnabled && s.iterations == 0 {
			return corruptf("LUKS1 keyslot %d has zero iterations", i)
		}
		for j, t := range l.slots {
			if i != j && s.offset >= t.offset && uint64(s.offset) < uint64(t.offset)+uint64(ms) {
				return corruptf("LUKS1 keyslots %d and %d overlap", i, j)
			}
		}
	}
	if st := l.staged; st != nil {
		for _, i := range st.slots {
			if i < 0 || i >= luks1NumKeys || l.slots[i].active != luks1KeyDisabled || l.slots[i].iterations == 0 || st.iter == 0 {
				return corruptf("LUKS1 staged key in keyslot %d: the keyslot is not a disabled one with a key", i)
			}
		}
		if r := st.respec; r != nil && l.payloadOffset != 0 && r.end() > l.payloadOffset {
			return corruptf("LUKS1 staged key: the keyslots of its %d-bit layout end at sector %d, after the data at %d", r.keyBytes*8, r.end(), l.payloadOffset)
		}
		if l.payloadOffset != 0 && l.stagedRecordsArea()+checkpointRoom > int64(l.payloadOffset)*sectorSize {
			return corruptf("LUKS1 staged key: no room for the checkpoint records before the data")
		}
	}
	return nil
}

func readLUKS1(r io.ReaderAt, first []byte) (*luks1, error) {
	l, err := decodePhdr1(first)
	if err != nil {
		return nil, err
	}
	if err := l.validate(); err != nil {
		return nil, err
	}
	end := l.materialEnd()
	if st := l.staged; st != nil && st.respec != nil {
		for _, i := range st.slots {
			end = max(end, uint64(st.respec.offset(i)+st.respec.materialSectors())*sectorSize)
		}
	}
	body, err := readAt(r, 0, int(end))
	if err != nil {
		return nil, fmt.Errorf("reading LUKS1 keyslot material (%d bytes): %w", end, err)
	}
	l.body = body
	return l, nil
}

func (l *luks1) cipher() (cipherSpec, error) { return parseCipherNameMode(l.cipherName, l.cipherMode) }

func (l *luks1) verifyKey(key []byte) (bool, error) {
	h, err := hashByName(l.hashSpec)
	if err != nil {
		return false, err
	}
	got := pbkdf2.Key(key, l.mkSalt[:], int(l.mkIter), luks1DigestSize, h)
	defer wipe(got)
	return subtle.ConstantTimeCompare(got, l.mkDigest[:]) == 1, nil
}

func (l *luks1) openSlot(i int, pass []byte) ([]byte, error) {
	if l.slots[i].active != luks1KeyEnabled {
		return nil, fmt.Errorf("keyslot %d is not active: %w", i, ErrNoKeyslot)
	}
	return l.openSlotMaterial(i, pass)
}

// openSlotMaterial derives keyslot i's key from pass and merges its
// material, whatever the keyslot's state (a staged key's is disabled).
// The result is not verified against any digest.
func (l *luks1) openSlotMaterial(i int, pass []byte) ([]byte, error) {
	s := l.slots[i]
	cs, keyBytes, offset, sectors, err := l.slotGeom(i)
	if err != nil {
		return nil, err
	}
	kdf := kdfParams{typ: KDFPBKDF2, hash: l.hashSpec, iterations: s.iterations}
	dk, err := kdf.derive(pass, s.salt[:], int(keyBytes))
	if err != nil {
		return nil, err
	}
	sc, err := newSectorCrypter(cs, dk)
	wipe(dk)
	if err != nil {
		return nil, err
	}
	off := uint64(offset) * sectorSize
	n := uint64(sectors) * sectorSize
	if uint64(len(l.body)) < off+n {
		return nil, corruptf("LUKS1 keyslot %d material [%d,%d) is past the header area read", i, off, off+n)
	}
	mat := make([]byte, n)
	copy(mat, l.body[off:off+n])
	defer wipe(mat)
	sc.decrypt(mat)
	return afMerge(mat, int(keyBytes), luksStripes, l.hashSpec)
}

func (l *luks1) setSlot(i int, key, pass []byte, kdf kdfParams) error {
	cs, keyBytes, offset, sectors, err := l.slotGeom(i)
	if err != nil {
		return err
	}
	if len(key) != int(keyBytes) {
		return fmt.Errorf("a %d-byte key for a keyslot of %d-byte keys: %w", len(key), keyBytes, ErrInvalidArgument)
	}
	salt, err := randomBytes(saltSize)
	if err != nil {
		return err
	}
	dk, err := kdf.derive(pass, salt, int(keyBytes))
	if err != nil {
		return err
	}
	sc, err := newSectorCrypter(cs, dk)
	wipe(dk)
	if err != nil {
		return err
	}
	mat, err := afSplit(key, luksStripes, l.hashSpec)
	if err != nil {
		return err
	}
	sc.encrypt(mat)
	off := uint64(offset) * sectorSize
	l.growBody(off + uint64(sectors)*sectorSize)
	copy(l.body[off:], mat)
	s := &l.slots[i]
	s.active = luks1KeyEnabled
	s.iterations = kdf.iterations
	copy(s.salt[:], salt)
	return nil
}
