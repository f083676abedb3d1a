package luks

import (
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Options describe a new header. Zero values select cryptsetup's defaults.
type Options struct {
	// Version is 1 (LUKS1) or 2 (LUKS2, the default).
	Version int
	// Cipher is the data cipher spec (default aes-xts-plain64); see
	// SupportedCiphers. The key size is the volume key's length.
	Cipher string
	// SectorSize is the encryption sector size in bytes: LUKS2 accepts
	// 512, 1024, 2048 or 4096 (default 512); LUKS1 only 512. It must equal
	// the device's logical block size (see CheckSectorSize).
	SectorSize int
	// HeaderSize is the data offset in bytes, a multiple of 4096 (and of
	// the sector size). Defaults: LUKS2 16 MiB, LUKS1 2 MiB. The smallest
	// value cryptsetup accepts is MinHeaderSize.
	HeaderSize int64
	// MetadataSize is the LUKS2 size of one metadata copy: 16 KiB (the
	// default), 32 KiB, ... 4 MiB.
	MetadataSize int64
	// KeyslotsSize is the LUKS2 keyslots area size, a multiple of 4096;
	// default HeaderSize - 2*MetadataSize, capped at 128 MiB.
	KeyslotsSize int64
	// Hash is the LUKS1 header hash (PBKDF2, AF and digest) or the LUKS2
	// digest and AF hash; default sha256.
	Hash string
	// PBKDF selects the passphrase KDF of the first keyslot.
	PBKDF PBKDF
	// UUID in canonical 8-4-4-4-12 form; random if empty.
	UUID string
	// Label and Subsystem (LUKS2 only), at most 47 bytes each.
	Label, Subsystem string
}

// MinHeaderSize returns the smallest data offset cryptsetup accepts for a
// key of keySize bytes. LUKS2: two metadata copies plus one keyslot area
// of keySize*4000 bytes rounded up to 4 KiB; with the default 16 KiB
// metadata and a 64-byte (AES-256-XTS) key that is 290816 bytes (568
// sectors), with a 32-byte key 163840 bytes (verified with cryptsetup
// 2.6.1: one 4096-byte step less is refused). LUKS1: the end of the
// material of all eight keyslots, rounded up to 4 KiB (2068480 bytes for a
// 64-byte key).
func MinHeaderSize(version, keySize int, metadataSize int64) int64 {
	if version == 1 {
		ms := uint64(afSectors(keySize, luksStripes))
		off := uint64(luks1AlignKeyslot / sectorSize)
		var end uint64
		for i := 0; i < luks1NumKeys; i++ {
			end = off + ms
			off = alignUp(end, luks1AlignKeyslot/sectorSize)
		}
		return int64(alignUp(end*sectorSize, luks1AlignKeyslot))
	}
	if metadataSize == 0 {
		metadataSize = DefaultMetadataSize
	}
	return 2*metadataSize + int64(alignUp(uint64(keySize)*luksStripes, luks2AreaAlign))
}

func checkLabel(s, what string) error {
	if len(s) > labelLen-1 || strings.IndexByte(s, 0) >= 0 {
		return fmt.Errorf("%s %q (at most %d bytes, no NUL): %w", what, s, labelLen-1, ErrInvalidArgument)
	}
	return nil
}

func newUUID() (string, error) {
	b, err := randomBytes(16)
	if err != nil {
		return "", err
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:], nil
}

func checkUUID(u string) error {
	if len(u) != 36 {
		return fmt.Errorf("UUID %q: %w", u, ErrInvalidArgument)
	}
	for i, c := range u {
		if i == 8 || i == 13 || i == 18 || i == 23 {
			if c != '-' {
				return fmt.Errorf("UUID %q: %w", u, ErrInvalidArgument)
			}
			continue
		}
		if !strings.ContainsRune("0123456789abcdefABCDEF", c) {
			return fmt.Errorf("UUID %q: %w", u, ErrInvalidArgument)
		}
	}
	return nil
}

// Create builds a new header in memory for the volume key vk, with
// keyslot 0 opened by passphrase (passphrase or key file contents). Write
// it with Image or WriteHeader. The volume key is not retained.
func Create(o Options, vk *VolumeKey, passphrase []byte) (*Header, error) {
	if vk.Len() == 0 {
		return nil, fmt.Errorf("empty volume key: %w", ErrInvalidArgument)
	}
	if o.Cipher == "" {
		o.Cipher = DefaultCipher
	}
	cs, err := parseCipher(o.Cipher)
	segCipher := o.Cipher
	switch {
	case err == nil:
		if err := cs.checkKeySize(vk.Len()); err != nil {
			return nil, err
		}
		segCipher = cs.String()
	case errors.Is(err, ErrUnsupported) && o.Version != 1:
		// LUKS2 with a cipher the kernel runs and this package does not
		// (serpent, twofish...): its keyslots use cryptsetup's fallback
		// area encryption (KeyslotEncryption), as a rekey's do.
		if err := CheckSegmentCipher(o.Cipher, vk.Len()); err != nil {
			return nil, err
		}
	default:
		return nil, err
	}
	if o.Hash == "" {
		o.Hash = DefaultHash
	}
	o.Hash = strings.ToLower(o.Hash)
	if _, err := hashByName(o.Hash); err != nil {
		return nil, err
	}
	if o.UUID == "" {
		if o.UUID, err = newUUID(); err != nil {
			return nil, err
		}
	} else if err := checkUUID(o.UUID); err != nil {
		return nil, err
	}
	o.UUID = strings.ToLower(o.UUID)
	if o.SectorSize == 0 {
		o.SectorSize = sectorSize
	}
	switch o.Version {
	case 1:
		return create1(o, cs, vk, passphrase)
	case 0, 2:
		return create2(o, segCipher, vk, passphrase)
	}
	return nil, fmt.Errorf("LUKS version %d: %w", o.Version, ErrInvalidArgument)
}

func create1(o Options, cs cipherSpec, vk *VolumeKey, pass []byte) (*Header, error) {
	if o.SectorSize != sectorSize {
		return nil, fmt.Errorf("LUKS1 supports only 512-byte sectors, not %d (use LUKS2): %w", o.SectorSize, ErrInvalidArgument)
	}
	if o.Label != "" || o.Subsystem != "" || o.MetadataSize != 0 || o.KeyslotsSize != 0 {
		return nil, fmt.Errorf("label, subsystem, metadata and keyslots size need LUKS2: %w", ErrInvalidArgument)
	}
	if o.PBKDF.Hash != "" && !strings.EqualFold(o.PBKDF.Hash, o.Hash) {
		return nil, fmt.Errorf("LUKS1 uses one hash for everything: pbkdf hash %q differs from header hash %q: %w", o.PBKDF.Hash, o.Hash, ErrInvalidArgument)
	}
	if o.HeaderSize == 0 {
		o.HeaderSize = DefaultLUKS1HeaderSize
	}
	minSize := MinHeaderSize(1, vk.Len(), 0)
	if o.HeaderSize%luks1AlignKeyslot != 0 || o.HeaderSize < minSize || o.HeaderSize/sectorSize > 0xffffffff {
		return nil, fmt.Errorf("LUKS1 header size %d (need a multiple of 4096, at least %d): %w", o.HeaderSize, minSize, ErrInvalidArgument)
	}
	l := &luks1{cipherName: cs.name, cipherMode: cs.mode, hashSpec: o.Hash,
		payloadOffset: uint32(o.HeaderSize / sectorSize), keyBytes: uint32(vk.Len()), uuid: o.UUID}
	ms := l.materialSectors()
	off := uint32(luks1AlignKeyslot / sectorSize)
	for i := range l.slots {
		l.slots[i] = slot1{active: luks1KeyDisabled, offset: off, stripes: luksStripes}
		off = uint32(alignUp(uint64(off+ms), luks1AlignKeyslot/sectorSize))
	}
	end := l.materialEnd()
	l.body = make([]byte, end)
	// cryptsetup fills the keyslot areas with random data at format time.
	rnd, err := randomBytes(int(end) - luks1AlignKeyslot)
	if err != nil {
		return nil, err
	}
	copy(l.body[luks1AlignKeyslot:], rnd)
	salt, err := randomBytes(saltSize)
	if err != nil {
		return nil, err
	}
	copy(l.mkSalt[:], salt)
	l.mkIter = digestIterations(o.PBKDF, o.Hash, vk.Len())
	if err := setMKDigest(l, vk.Bytes()); err != nil {
		return nil, err
	}
	h := &Header{v1: l}
	if _, err := h.AddKeyslot(vk, pass, o.PBKDF); err != nil {
		return nil, err
	}
	h.dirtyBefore, h.dirtyAfter = nil, nil
	return h, nil
}

func setMKDigest(l *luks1, key []byte) error {
	h, err := hashByName(l.hashSpec)
	if err != nil {
		return err
	}
	d := pbkdf2Key(key, l.mkSalt[:], int(l.mkIter), luks1DigestSize, h)
	copy(l.mkDigest[:], d)
	return nil
}

func create2(o Options, segCipher string, vk *VolumeKey, pass []byte) (*Header, error) {
	ss := o.SectorSize
	if ss != 512 && ss != 1024 && ss != 2048 && ss != 4096 {
		return nil, fmt.Errorf("sector size %d (LUKS2 accepts 512, 1024, 2048, 4096): %w", ss, ErrInvalidArgument)
	}
	if err := checkLabel(o.Label, "label"); err != nil {
		return nil, err
	}
	if err := checkLabel(o.Subsystem, "subsystem"); err != nil {
		return nil, err
	}
	md := o.MetadataSize
	if md == 0 {
		md = DefaultMetadataSize
	}
	valid := false
	for _, s := range luks2MetadataSizes {
		valid = valid || uint64(md) == s
	}
	if !valid {
		return nil, fmt.Errorf("metadata size %d (16 KiB, 32 KiB, ... 4 MiB): %w", md, ErrInvalidArgument)
	}
	hs := o.HeaderSize
	if hs == 0 {
		hs = DefaultLUKS2HeaderSize
	}
	minSize := MinHeaderSize(2, vk.Len(), md)
	if hs%luks2AreaAlign != 0 || hs%int64(ss) != 0 || hs < minSize {
		return nil, fmt.Errorf("LUKS2 header size %d (need a multiple of 4096 and of the sector size, at least %d): %w", hs, minSize, ErrInvalidArgument)
	}
	ks := o.KeyslotsSize
	if ks == 0 {
		ks = min(hs-2*md, luks2MaxKeyslotsSize)
		ks -= ks % luks2AreaAlign
	}
	if ks%luks2AreaAlign != 0 || ks > luks2MaxKeyslotsSize || ks > hs-2*md || ks < minSize-2*md {
		return nil, fmt.Errorf("keyslots size %d (multiple of 4096, %d..%d): %w", ks, minSize-2*md, min(hs-2*md, luks2MaxKeyslotsSize), ErrInvalidArgument)
	}
	root := newObject()
	root.set("keyslots", []byte("{}"))
	root.set("tokens", []byte("{}"))
	seg := newObject()
	seg.set("type", jsonRaw("crypt"))
	seg.set("offset", jsonRaw(strconv.FormatInt(hs, 10)))
	seg.set("size", jsonRaw("dynamic"))
	seg.set("iv_tweak", jsonRaw("0"))
	seg.set("encryption", jsonRaw(segCipher))
	seg.set("sector_size", jsonRaw(ss))
	segs := newObject()
	segs.setObject("0", seg)
	root.setObject("segments", segs)
	root.set("digests", []byte("{}"))
	config := newObject()
	config.set("json_size", jsonRaw(strconv.FormatInt(md-luks2BinSize, 10)))
	config.set("keyslots_size", jsonRaw(strconv.FormatInt(ks, 10)))
	root.setObject("config", config)

	l := &luks2{hdrSize: uint64(md), seqid: 1, label: o.Label, subsystem: o.Subsystem,
		csumAlg: "sha256", uuid: o.UUID, root: root}
	for i := range l.salt {
		s, err := randomBytes(saltLen2)
		if err != nil {
			return nil, err
		}
		copy(l.salt[i][:], s)
	}
	area, err := randomBytes(int(ks))
	if err != nil {
		return nil, err
	}
	l.area = area
	// Digest 0, bound to segment 0.
	d, err := newDigest(vk.Bytes(), o.Hash, digestIterations(o.PBKDF, o.Hash, vk.Len()))
	if err != nil {
		return nil, err
	}
	d.set("segments", jsonRaw([]string{"0"}))
	digests := newObject()
	digests.setObject("0", d)
	root.setObject("digests", digests)

	h := &Header{v2: l}
	p := o.PBKDF
	if p.Hash == "" {
		p.Hash = o.Hash
	}
	if _, err := h.AddKeyslot(vk, pass, p); err != nil {
		return nil, err
	}
	if err := validate2(root, l.hdrSize); err != nil {
		return nil, fmt.Errorf("internal: created metadata fails validation: %w", err)
	}
	h.dirtyBefore, h.dirtyAfter = nil, nil
	return h, nil
}

// newDigest builds a pbkdf2 digest object with empty keyslots/segments.
func newDigest(key []byte, hash string, iterations uint32) (*object, error) {
	hf, err := hashByName(hash)
	if err != nil {
		return nil, err
	}
	salt, err := randomBytes(saltSize)
	if err != nil {
		return nil, err
	}
	dg := pbkdf2Key(key, salt, int(iterations), hf().Size(), hf)
	d := newObject()
	d.set("type", jsonRaw("pbkdf2"))
	d.set("keyslots", jsonRaw([]string{}))
	d.set("segments", jsonRaw([]string{}))
	d.set("hash", jsonRaw(hash))
	d.set("iterations", jsonRaw(iterations))
	d.set("salt", jsonRaw(base64.StdEncoding.EncodeToString(salt)))
	d.set("digest", jsonRaw(base64.StdEncoding.EncodeToString(dg)))
	return d, nil
}
