package luks

import (
	"encoding/base64"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// AddKeyslot adds a keyslot holding vk, which must be the data segment's
// volume key (checked against the digest), opened by key (a passphrase or
// key file contents) with the given PBKDF. It returns the keyslot id. The
// change is in memory; Commit writes it (material first, then metadata).
func (h *Header) AddKeyslot(vk *VolumeKey, key []byte, p PBKDF) (int, error) {
	if h.v1 != nil {
		return h.addKeyslot1(vk, key, p)
	}
	return h.addKeyslot2(vk, key, p, true, "")
}

// AddUnboundKeyslot adds a LUKS2 keyslot for a key that is not the data
// segment's volume key (cryptsetup's luksAddKey --unbound): its digest is
// not assigned to any segment. A rekey keeps the new volume key in such a
// keyslot until BindSegment switches the data segment over to it.
//
// For LUKS1, which has no unbound keyslots, the key is staged for a
// dmconvert rekey instead (rekey1.go): only in a disguised header, and
// with the header's cipher and key size.
func (h *Header) AddUnboundKeyslot(vk *VolumeKey, key []byte, p PBKDF) (int, error) {
	if h.v1 != nil {
		return h.stageKey1(vk, key, p, "")
	}
	return h.addKeyslot2(vk, key, p, false, "")
}

// AddUnboundKeyslotFor adds an unbound LUKS2 keyslot for vk, the volume
// key a data segment will have once it is encrypted with segmentCipher
// (a rekey that changes the cipher or key size; BindSegmentCipher makes
// the switch). The keyslot area is encrypted as cryptsetup would encrypt
// a keyslot of that segment (KeyslotEncryption). segmentCipher and the
// key size are checked with CheckSegmentCipher.
// LUKS1 stages the key as AddUnboundKeyslot does; segmentCipher must be
// the header's cipher.
func (h *Header) AddUnboundKeyslotFor(vk *VolumeKey, key []byte, p PBKDF, segmentCipher string) (int, error) {
	if h.v1 != nil {
		return h.stageKey1(vk, key, p, segmentCipher)
	}
	if err := CheckSegmentCipher(segmentCipher, vk.Len()); err != nil {
		return -1, err
	}
	return h.addKeyslot2(vk, key, p, false, segmentCipher)
}

// freeSlot sets p's hash to the header's (LUKS1 keyslots all use it; a
// different one is an error) and returns the first keyslot not in use,
// or -1 when all are.
func (l *luks1) freeSlot(p *PBKDF) (int, error) {
	if p.Hash != "" && !strings.EqualFold(p.Hash, l.hashSpec) {
		return -1, fmt.Errorf("LUKS1 keyslots use the header hash %s, not %s: %w", l.hashSpec, p.Hash, ErrInvalidArgument)
	}
	p.Hash = l.hashSpec
	for i, s := range l.slots {
		// A staged key's keyslot is disabled in the phdr, but taken.
		if s.active != luks1KeyEnabled && !l.isStaged(i) {
			return i, nil
		}
	}
	return -1, nil
}

func (h *Header) addKeyslot1(vk *VolumeKey, key []byte, p PBKDF) (int, error) {
	l := h.v1
	if err := h.VerifyVolumeKey(vk); err != nil {
		return -1, err
	}
	slot, err := l.freeSlot(&p)
	if err != nil {
		return -1, err
	}
	if slot < 0 {
		return -1, fmt.Errorf("all %d LUKS1 keyslots are active: %w", luks1NumKeys, ErrNoSpace)
	}
	kdf, err := p.resolve(true, int(l.keyBytes))
	if err != nil {
		return -1, err
	}
	if err := l.setSlot(slot, vk.Bytes(), key, kdf); err != nil {
		return -1, err
	}
	h.dirtyBefore = append(h.dirtyBefore, span{int64(l.slots[slot].offset) * sectorSize, int64(l.materialSectors()) * sectorSize})
	return slot, nil
}

// addKeyslot2 adds a LUKS2 keyslot. Its area is encrypted for a segment
// with cipher forCipher and vk's key size, or, when forCipher is empty,
// for the data segment as it is (its cipher and key size).
func (h *Header) addKeyslot2(vk *VolumeKey, key []byte, p PBKDF, bound bool, forCipher string) (int, error) {
	l := h.v2
	keyLen := vk.Len()
	if keyLen == 0 || keyLen > MaxVolumeKeySize {
		return -1, fmt.Errorf("volume key size %d: %w", keyLen, ErrInvalidArgument)
	}
	segD, seg, err := l.segmentDigest()
	if err != nil {
		return -1, err
	}
	isSegKey, err := segD.verify(vk.Bytes())
	if err != nil {
		return -1, err
	}
	keyslots := l.sec("keyslots")
	digests := l.sec("digests")
	id, ok := freeID(keyslots, luks2MaxObjects)
	if !ok {
		return -1, fmt.Errorf("all %d LUKS2 keyslots are active: %w", luks2MaxObjects, ErrNoSpace)
	}
	var digestID int
	var digestObj *object
	if bound {
		if !isSegKey {
			return -1, ErrWrongKey
		}
		digestID = segD.id
	} else {
		if isSegKey {
			return -1, fmt.Errorf("the key is the data segment's volume key; add a bound keyslot instead: %w", ErrInvalidArgument)
		}
		ds, err := l.digests()
		if err != nil {
			return -1, err
		}
		digestID = -1
		for _, d := range ds {
			if len(d.segments) > 0 {
				continue
			}
			if ok, err := d.verify(vk.Bytes()); err == nil && ok {
				digestID = d.id
				break
			}
		}
		if digestID < 0 {
			var ok bool
			if digestID, ok = freeID(digests, luks2MaxDigests); !ok {
				return -1, fmt.Errorf("all %d digests in use: %w", luks2MaxDigests, ErrNoSpace)
			}
			dh := segD.hash
			digestObj, err = newDigest(vk.Bytes(), dh, digestIterations(p, dh, keyLen))
			if err != nil {
				return -1, err
			}
		}
	}
	if digestObj == nil {
		if digestObj, err = digests.getObject(strconv.Itoa(digestID)); err != nil || digestObj == nil {
			return -1, corruptf("digest %d", digestID)
		}
	}

	// Keyslot area encryption: the segment cipher with the segment's key
	// size, as cryptsetup's crypt_keyslot_get_encryption chooses it
	// (aes-xts-plain64 when this package cannot run the segment cipher).
	segCipher, segKeySize := seg.encryption, h.VolumeKeySize()
	if segKeySize == 0 {
		segKeySize = keyLen
	}
	if forCipher != "" {
		segCipher, segKeySize = forCipher, keyLen
	}
	areaCipher, areaKeySize := KeyslotEncryption(segCipher, segKeySize)
	cs, err := parseCipher(areaCipher)
	if err != nil {
		return -1, fmt.Errorf("keyslot encryption %s: %w", areaCipher, err)
	}
	if err := cs.checkKeySize(areaKeySize); err != nil {
		return -1, err
	}
	afHash := p.Hash
	if afHash == "" {
		afHash = DefaultHash
	}
	afHash = strings.ToLower(afHash)
	kdf, err := p.resolve(false, areaKeySize)
	if err != nil {
		return -1, err
	}
	areaLen := alignUp(uint64(keyLen)*luksStripes, luks2AreaAlign)
	areaOff, err := l.findAreaGap(areaLen)
	if err != nil {
		return -1, err
	}
	salt, err := randomBytes(saltSize)
	if err != nil {
		return -1, err
	}
	dk, err := kdf.derive(key, salt, areaKeySize)
	if err != nil {
		return -1, err
	}
	sc, err := newSectorCrypter(cs, dk)
	wipe(dk)
	if err != nil {
		return -1, err
	}
	mat, err := afSplit(vk.Bytes(), luksStripes, afHash)
	if err != nil {
		return -1, err
	}
	sc.encrypt(mat)

	// JSON, in cryptsetup's member order.
	ks := newObject()
	ks.set("type", jsonRaw("luks2"))
	ks.set("key_size", jsonRaw(keyLen))
	af := newObject()
	af.set("type", jsonRaw("luks1"))
	af.set("stripes", jsonRaw(luksStripes))
	af.set("hash", jsonRaw(afHash))
	ks.setObject("af", af)
	area := newObject()
	area.set("type", jsonRaw("raw"))
	area.set("offset", jsonRaw(strconv.FormatUint(areaOff, 10)))
	area.set("size", jsonRaw(strconv.FormatUint(areaLen, 10)))
	area.set("encryption", jsonRaw(cs.String()))
	area.set("key_size", jsonRaw(areaKeySize))
	ks.setObject("area", area)
	kd := newObject()
	kd.set("type", jsonRaw(kdf.typ))
	if kdf.typ == KDFPBKDF2 {
		kd.set("hash", jsonRaw(kdf.hash))
		kd.set("iterations", jsonRaw(kdf.iterations))
	} else {
		kd.set("time", jsonRaw(kdf.iterations))
		kd.set("memory", jsonRaw(kdf.memory))
		kd.set("cpus", jsonRaw(kdf.parallel))
	}
	kd.set("salt", jsonRaw(base64.StdEncoding.EncodeToString(salt)))
	ks.setObject("kdf", kd)

	saved := l.root.marshal()
	keyslots.setObject(strconv.Itoa(id), ks)
	raw, _ := digestObj.get("keyslots")
	refs, _ := stringArray(raw)
	digestObj.set("keyslots", jsonRaw(append(refs, strconv.Itoa(id))))
	digests.setObject(strconv.Itoa(digestID), digestObj)
	l.setSec("keyslots", keyslots)
	l.setSec("digests", digests)
	if _, err := l.jsonText(); err != nil {
		l.root, _ = parseObject(saved)
		return -1, err
	}
	if err := validate2(l.root, l.hdrSize); err != nil {
		l.root, _ = parseObject(saved)
		return -1, fmt.Errorf("internal: new keyslot fails validation: %w", err)
	}
	start := areaOff - 2*l.hdrSize
	copy(l.area[start:], mat)
	h.dirtyBefore = append(h.dirtyBefore, span{int64(areaOff), int64(len(mat))})
	return id, nil
}

// RemoveKeyslot deletes a keyslot: its metadata now, its material (wiped
// with random data) after the metadata on Commit. It refuses to remove
// the last keyslot that opens the data segment.
func (h *Header) RemoveKeyslot(slot int) error {
	var bound []int
	for _, k := range h.Keyslots() {
		if k.Bound {
			bound = append(bound, k.ID)
		}
	}
	if len(bound) == 1 && bound[0] == slot {
		return fmt.Errorf("keyslot %d is the last one that opens the data: %w", slot, ErrInvalidArgument)
	}
	if h.v1 != nil {
		l := h.v1
		if l.isStaged(slot) {
			return h.dropStaged1(slot)
		}
		if slot < 0 || slot >= luks1NumKeys || l.slots[slot].active != luks1KeyEnabled {
			return fmt.Errorf("keyslot %d is not active: %w", slot, ErrNoKeyslot)
		}
		l.slots[slot].active = luks1KeyDisabled
		return h.wipeSlot1(slot)
	}
	l := h.v2
	ks, err := l.keyslot(slot)
	if err != nil {
		return err
	}
	keyslots := l.sec("keyslots")
	keyslots.del(strconv.Itoa(slot))
	l.setSec("keyslots", keyslots)
	name := strconv.Itoa(slot)
	l.rewriteKeyslotRefs("digests", name, "", true)
	l.rewriteKeyslotRefs("tokens", name, "", false)
	return h.wipeArea2(ks)
}

// rewriteKeyslotRefs changes keyslot from to keyslot to in the "keyslots"
// array of every object of section sec (digests, tokens); to "" drops
// it. With dropUnused an object left with no keyslot and no segment (an
// unbound digest nobody uses any more) is deleted.
func (l *luks2) rewriteKeyslotRefs(sec, from, to string, dropUnused bool) {
	o := l.sec(sec)
	for _, k := range slices.Clone(o.keys) {
		d, err := o.getObject(k)
		if err != nil || d == nil {
			continue
		}
		raw, _ := d.get("keyslots")
		refs, _ := stringArray(raw)
		if !slices.Contains(refs, from) {
			continue
		}
		refs = slices.DeleteFunc(refs, func(s string) bool { return s == from })
		if to != "" && !slices.Contains(refs, to) {
			refs = append(refs, to)
			sortNumericStrings(refs)
		}
		rawSeg, _ := d.get("segments")
		segs, _ := stringArray(rawSeg)
		if dropUnused && len(refs) == 0 && len(segs) == 0 {
			o.del(k)
			continue
		}
		d.set("keyslots", jsonRaw(refs))
		o.setObject(k, d)
	}
	l.setSec(sec, o)
}

// wipeArea2 overwrites a removed LUKS2 keyslot's material with random
// data, written after the metadata that no longer names it (Commit).
func (h *Header) wipeArea2(ks *keyslot2) error {
	l := h.v2
	if ks.typ != "luks2" || ks.areaSize == 0 {
		return nil
	}
	start := ks.areaOffset - 2*l.hdrSize
	n := min(ks.areaSize, uint64(len(l.area))-start)
	rnd, err := randomBytes(int(n))
	if err != nil {
		return err
	}
	copy(l.area[start:], rnd)
	h.dirtyAfter = append(h.dirtyAfter, span{int64(ks.areaOffset), int64(n)})
	return nil
}

// ReplaceKeyslot gives keyslot staged the place of keyslot old (LUKS2):
// old is removed (its material wiped after the metadata on Commit) and
// staged takes its number and its priority, so that whatever names old
// (tokens bound to it, such as a TPM2 or FIDO2 enrollment, crypttab's
// key-slot=, scripts) names staged from then on. staged's key material
// stays where it is. old must not open the data segment (bind staged's
// key first). In memory; write with Commit.
func (h *Header) ReplaceKeyslot(old, staged int) error {
	if h.v1 != nil {
		return fmt.Errorf("LUKS1 keyslot numbers are their places on the disk: %w", ErrUnsupported)
	}
	if old == staged {
		return fmt.Errorf("keyslot %d cannot replace itself: %w", old, ErrInvalidArgument)
	}
	l := h.v2
	oldKs, err := l.keyslot(old)
	if err != nil {
		return err
	}
	if _, err := l.keyslot(staged); err != nil {
		return err
	}
	for _, k := range h.Keyslots() {
		if k.ID == old && k.Bound {
			return fmt.Errorf("keyslot %d still opens the data: %w", old, ErrInvalidArgument)
		}
	}
	oldName, stagedName := strconv.Itoa(old), strconv.Itoa(staged)
	keyslots := l.sec("keyslots")
	obj, err := keyslots.getObject(stagedName)
	if err != nil || obj == nil {
		return corruptf("keyslot %d", staged)
	}
	oldObj, err := keyslots.getObject(oldName)
	if err != nil || oldObj == nil {
		return corruptf("keyslot %d", old)
	}
	if p, ok := oldObj.get("priority"); ok {
		obj.set("priority", p)
	} else {
		obj.del("priority")
	}
	keyslots.del(stagedName)
	keyslots.setObject(oldName, obj) // old's member, replaced in place
	l.setSec("keyslots", keyslots)
	// old leaves its digest (the old key's, which goes with its last
	// keyslot) and staged's digest names it as old. Tokens bound to old
	// stay bound to its number; one bound to staged follows it.
	l.rewriteKeyslotRefs("digests", oldName, "", true)
	l.rewriteKeyslotRefs("digests", stagedName, oldName, true)
	l.rewriteKeyslotRefs("tokens", stagedName, oldName, false)
	return h.wipeArea2(oldKs)
}

// sortNumericStrings sorts decimal ids ("2" before "10").
func sortNumericStrings(ids []string) {
	slices.SortFunc(ids, func(a, b string) int {
		if len(a) != len(b) {
			return len(a) - len(b)
		}
		return strings.Compare(a, b)
	})
}

// BindSegment makes the key held by keyslot slot the data segment's
// volume key (LUKS2): the segment moves from its current digest to slot's
// digest. Keyslots of the old digest stay, now unbound, until removed.
// The key size must suit the segment cipher. In memory; write with
// WriteMetadata or Commit.
func (h *Header) BindSegment(slot int) error { return h.BindSegmentCipher(slot, "") }

// BindSegmentCipher is BindSegment that also sets the data segment's
// cipher spec ("encryption") to cipher, unless cipher is empty (a rekey
// to another cipher or key size). The key size must suit the cipher
// (CheckSegmentCipher).
//
// LUKS1: slot must hold a dmconvert rekey's staged key (rekey1.go), which
// becomes the volume key (the MK digest is replaced, the keyslot
// enabled); cipher must be empty or the header's. The other keyslots
// still hold the old key: remove them.
func (h *Header) BindSegmentCipher(slot int, cipher string) error {
	if h.v1 != nil {
		return h.bindStaged1(slot, cipher)
	}
	l := h.v2
	ks, err := l.keyslot(slot)
	if err != nil {
		return err
	}
	nd, err := l.digestOfKeyslot(slot)
	if err != nil {
		return err
	}
	od, seg, err := l.segmentDigest()
	if err != nil {
		return err
	}
	if cipher == "" {
		cipher = seg.encryption
	}
	if err := CheckSegmentCipher(cipher, ks.keySize); err != nil {
		return err
	}
	if nd.id == od.id {
		if cipher != seg.encryption {
			return fmt.Errorf("keyslot %d holds the segment's own key: changing its cipher to %s would make the data unreadable: %w", slot, cipher, ErrInvalidArgument)
		}
		return nil
	}
	segName := strconv.Itoa(seg.id)
	var segObj *object
	if cipher != seg.encryption {
		if segObj, err = l.sec("segments").getObject(segName); err != nil || segObj == nil {
			return corruptf("segment %d", seg.id)
		}
	}
	digests := l.sec("digests")
	for _, id := range []int{od.id, nd.id} {
		d, err := digests.getObject(strconv.Itoa(id))
		if err != nil || d == nil {
			return corruptf("digest %d", id)
		}
		raw, _ := d.get("segments")
		segs, _ := stringArray(raw)
		segs = slices.DeleteFunc(segs, func(s string) bool { return s == segName })
		if id == nd.id {
			segs = append(segs, segName)
		}
		d.set("segments", jsonRaw(segs))
		digests.setObject(strconv.Itoa(id), d)
	}
	l.setSec("digests", digests)
	if segObj != nil {
		segObj.set("encryption", jsonRaw(cipher))
		segs := l.sec("segments")
		segs.setObject(segName, segObj)
		l.setSec("segments", segs)
	}
	return nil
}
