package luks

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"testing"
)

// A LUKS1 header with a staged rekey key (rekey1.go): staging, the record
// in the disguised phdr, both keys from one passphrase, binding and
// dropping the staged key, and the refusals.

func newLUKS1(t *testing.T, keyLen int, pass string) (*Header, []byte) {
	t.Helper()
	key := bytes.Repeat([]byte{0x5c}, keyLen)
	vk := NewVolumeKeyFromBytes(key)
	defer vk.Wipe()
	h, err := Create(Options{Version: 1, Cipher: "aes-xts-plain64", PBKDF: PBKDF{Type: KDFPBKDF2, Iterations: MinPBKDF2Iterations}}, vk, []byte(pass))
	if err != nil {
		t.Fatal(err)
	}
	return h, key
}

// reread writes h's image and reads it back, as a journal or the disk
// would hand it over.
func reread(t *testing.T, h *Header) *Header {
	t.Helper()
	img, err := h.Image()
	if err != nil {
		t.Fatal(err)
	}
	back, err := Read(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	return back
}

func stage1(t *testing.T, h *Header, newKey []byte, pass string) int {
	t.Helper()
	vk := NewVolumeKeyFromBytes(newKey)
	defer vk.Wipe()
	ks := h.Keyslots()
	slot, err := h.AddUnboundKeyslotFor(vk, []byte(pass), ks[0].PBKDF, h.Cipher())
	if err != nil {
		t.Fatal(err)
	}
	return slot
}

func TestLUKS1StagedKey(t *testing.T) {
	h, oldKey := newLUKS1(t, 64, "pw")
	newKey := bytes.Repeat([]byte{0xa3}, 64)
	if err := h.SetDisguised(true); err != nil {
		t.Fatal(err)
	}
	slot := stage1(t, h, newKey, "pw")
	if slot != 1 || h.StagedKeyslot() != 1 {
		t.Fatalf("staged in keyslot %d (StagedKeyslot %d), want the first free one, 1", slot, h.StagedKeyslot())
	}
	area, err := h.CheckpointArea()
	if want := int64(alignUp(h.v1.materialEnd(), 4096)); err != nil || area != want {
		t.Fatalf("checkpoint records at %d (%v), want %d: after the keyslot material while a key is staged", area, err, want)
	}
	if err := h.SetCheckpoint([]byte(`{"run":"r"}`)); err != nil {
		t.Fatal(err)
	}
	back := reread(t, h)
	if !back.Disguised() || back.StagedKeyslot() != 1 {
		t.Fatalf("read back: disguised %v, staged %d", back.Disguised(), back.StagedKeyslot())
	}
	if p, err := back.Checkpoint(); err != nil || string(p) != `{"run":"r"}` {
		t.Fatalf("checkpoint read back: %q, %v", p, err)
	}
	listed := back.Keyslots()
	if len(listed) != 2 || listed[0].ID != 0 || !listed[0].Bound || listed[1].ID != 1 || listed[1].Bound || listed[1].PBKDF.Iterations != listed[0].PBKDF.Iterations {
		t.Fatalf("keyslots %+v: want 0 bound and 1 unbound with the same iterations", listed)
	}
	vk, id, err := back.Unlock([]byte("pw"))
	if err != nil || id != 0 || !bytes.Equal(vk.Bytes(), oldKey) {
		t.Fatalf("Unlock: keyslot %d, old key %v, %v", id, err == nil && bytes.Equal(vk.Bytes(), oldKey), err)
	}
	uk, id, err := back.UnlockUnbound([]byte("pw"))
	if err != nil || id != 1 || !bytes.Equal(uk.Bytes(), newKey) {
		t.Fatalf("UnlockUnbound: keyslot %d, new key %v, %v", id, err == nil && bytes.Equal(uk.Bytes(), newKey), err)
	}
	if _, _, err := back.UnlockUnbound([]byte("wrong")); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("UnlockUnbound with a wrong passphrase: %v", err)
	}
	// The staged keyslot is disabled in the phdr: a header read without
	// the record (it is in the padding cryptsetup ignores) has one more
	// free keyslot, and a plain header never carries the record.
	if back.v1.slots[1].active != luks1KeyDisabled {
		t.Fatal("the staged keyslot is enabled in the phdr")
	}
	if err := back.SetDisguised(false); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("revealing a header with a staged key: %v", err)
	}
	if err := back.Reveal(&recordingWriter{}); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("Reveal of a header with a staged key: %v", err)
	}

	t.Run("bind", func(t *testing.T) {
		b := reread(t, h)
		if err := b.BindSegmentCipher(1, ""); err != nil {
			t.Fatal(err)
		}
		if err := b.RemoveKeyslot(0); err != nil {
			t.Fatal(err)
		}
		if err := b.SetDataOffset(b.DataOffset() - 24<<10); err != nil {
			t.Fatal(err)
		}
		b.RemoveCheckpoint()
		if err := b.SetDisguised(false); err != nil {
			t.Fatal(err)
		}
		f := reread(t, b)
		if f.Disguised() || f.StagedKeyslot() != -1 || f.DataOffset() != h.DataOffset()-24<<10 {
			t.Fatalf("final: disguised %v, staged %d, data at %d", f.Disguised(), f.StagedKeyslot(), f.DataOffset())
		}
		img, _ := f.Image()
		if !bytes.Equal(img[l1OffStaged:1024], make([]byte, 1024-l1OffStaged)) {
			t.Fatal("the final phdr's padding is not zero")
		}
		vk, id, err := f.Unlock([]byte("pw"))
		if err != nil || id != 1 || !bytes.Equal(vk.Bytes(), newKey) {
			t.Fatalf("final Unlock: keyslot %d, new key %v, %v", id, err == nil && bytes.Equal(vk.Bytes(), newKey), err)
		}
		if err := f.VerifyVolumeKey(NewVolumeKeyFromBytes(oldKey)); !errors.Is(err, ErrWrongKey) {
			t.Fatalf("the old key against the final header: %v", err)
		}
		if ks := f.Keyslots(); len(ks) != 1 || ks[0].ID != 1 || !ks[0].Bound {
			t.Fatalf("final keyslots %+v", ks)
		}
	})
	t.Run("drop", func(t *testing.T) {
		b := reread(t, h)
		if err := b.RemoveKeyslot(1); err != nil {
			t.Fatal(err)
		}
		if len(b.dirtyAfter) != 1 || b.dirtyAfter[0].off != int64(b.v1.slots[1].offset)*512 {
			t.Fatalf("dropping the staged key queues wipes %v", b.dirtyAfter)
		}
		if err := b.SetDisguised(false); err != nil {
			t.Fatal(err)
		}
		f := reread(t, b)
		if _, _, err := f.UnlockUnbound([]byte("pw")); !errors.Is(err, ErrNoKeyslot) {
			t.Fatalf("UnlockUnbound after the drop: %v", err)
		}
		vk, id, err := f.Unlock([]byte("pw"))
		if err != nil || id != 0 || !bytes.Equal(vk.Bytes(), oldKey) || f.DataOffset() != h.DataOffset() {
			t.Fatalf("after the drop: keyslot %d, old key %v, data at %d, %v", id, err == nil && bytes.Equal(vk.Bytes(), oldKey), f.DataOffset(), err)
		}
		if s := f.v1.slots[1]; s.active != luks1KeyDisabled || s.iterations != 0 || s.salt != [saltSize]byte{} {
			t.Fatalf("the dropped keyslot: %+v", s)
		}
	})
	t.Run("damaged record", func(t *testing.T) {
		img, _ := h.Image()
		img[l1OffStaged+20] ^= 1
		if _, err := Read(bytes.NewReader(img)); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("a staged-key record with a bad checksum: %v", err)
		}
	})
	t.Run("record in a plain header", func(t *testing.T) {
		// cryptsetup ignores the padding; so does Read, unless the
		// header is disguised.
		img, _ := h.Image()
		copy(img, magicLUKS)
		img[6], img[7] = 0, 1
		p, err := Read(bytes.NewReader(img))
		if err != nil || p.StagedKeyslot() != -1 {
			t.Fatalf("plain header with the record's bytes: staged %d, %v", p.StagedKeyslot(), err)
		}
	})
}

func TestLUKS1StageRefusals(t *testing.T) {
	newKey := bytes.Repeat([]byte{0xa3}, 64)
	vk := NewVolumeKeyFromBytes(newKey)
	p := PBKDF{Type: KDFPBKDF2, Iterations: MinPBKDF2Iterations}
	for _, c := range []struct {
		name   string
		prep   func(h *Header)
		key    *VolumeKey
		cipher string
		want   error
	}{
		{"not disguised", func(h *Header) {}, vk, "", ErrInvalidArgument},
		{"a cipher dmconvert does not run", nil, vk, "camellia-xts-plain64", ErrUnsupported},
		{"a key size the cipher does not take", nil, vk, "aes-cbc-essiv:sha256", ErrInvalidArgument},
		{"the old key", nil, NewVolumeKeyFromBytes(bytes.Repeat([]byte{0x5c}, 64)), "", ErrInvalidArgument},
		{"staged twice", func(h *Header) {
			h.SetDisguised(true)
			if _, err := h.AddUnboundKeyslot(NewVolumeKeyFromBytes(bytes.Repeat([]byte{1}, 64)), []byte("pw"), p); err != nil {
				t.Fatal(err)
			}
		}, vk, "", ErrInvalidArgument},
		{"all keyslots in use", func(h *Header) {
			old := NewVolumeKeyFromBytes(bytes.Repeat([]byte{0x5c}, 64))
			for i := 1; i < 8; i++ {
				if _, err := h.AddKeyslot(old, []byte("pw"), p); err != nil {
					t.Fatal(err)
				}
			}
			h.SetDisguised(true)
		}, vk, "", ErrNoSpace},
	} {
		h, _ := newLUKS1(t, 64, "pw")
		if c.prep != nil {
			c.prep(h)
		} else if err := h.SetDisguised(true); err != nil {
			t.Fatal(err)
		}
		if _, err := h.AddUnboundKeyslotFor(c.key, []byte("pw"), p, c.cipher); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	// A key size whose keyslot layout ends after the data: a 256-bit
	// header with its data at sector 3000, a 512-bit key (its keyslots
	// would end at 4036).
	h, _ := newLUKS1(t, 32, "pw")
	h.v1.payloadOffset = 3000
	if err := h.SetDisguised(true); err != nil {
		t.Fatal(err)
	}
	if _, err := h.AddUnboundKeyslotFor(vk, []byte("pw"), p, "aes-xts-plain64"); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("a 512-bit layout past the data: %v", err)
	}
	// No staged key: nothing to bind, and UnlockUnbound finds nothing.
	h, _ = newLUKS1(t, 32, "pw")
	if err := h.BindSegmentCipher(1, ""); !errors.Is(err, ErrNoKeyslot) {
		t.Fatalf("binding without a staged key: %v", err)
	}
	if _, _, err := h.UnlockUnbound([]byte("pw")); !errors.Is(err, ErrNoKeyslot) {
		t.Fatalf("UnlockUnbound without a staged key: %v", err)
	}
	if err := h.SetDataOffset(1024); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("a data offset inside the keyslot material: %v", err)
	}
}

// TestLUKS1StagedKeySeveralKeyslots: a rekey that keeps two passphrases
// stages the same key twice; the record names both keyslots (a mask),
// each passphrase opens its own, binding enables both, dropping one at a
// time leaves the other staged (the record back to one keyslot).
func TestLUKS1StagedKeySeveralKeyslots(t *testing.T) {
	h, _ := newLUKS1(t, 64, "pw")
	p := PBKDF{Type: KDFPBKDF2, Iterations: MinPBKDF2Iterations}
	old := NewVolumeKeyFromBytes(bytes.Repeat([]byte{0x5c}, 64))
	if _, err := h.AddKeyslot(old, []byte("other"), p); err != nil {
		t.Fatal(err)
	}
	if err := h.SetDisguised(true); err != nil {
		t.Fatal(err)
	}
	newKey := bytes.Repeat([]byte{0xa3}, 64)
	if s := stage1(t, h, newKey, "pw"); s != 2 {
		t.Fatalf("first staged keyslot %d, want 2", s)
	}
	if s := stage1(t, h, newKey, "other"); s != 3 {
		t.Fatalf("second staged keyslot %d, want 3 (the staged keyslot 2 is taken)", s)
	}
	if _, err := h.AddUnboundKeyslot(NewVolumeKeyFromBytes(bytes.Repeat([]byte{1}, 64)), []byte("pw"), p); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("staging another key next to the staged one: %v", err)
	}
	img, _ := h.Image()
	if string(img[l1OffStaged:l1OffStaged+8]) != "DMCVTRK2" || img[l1OffStaged+11] != 0b1100 {
		t.Fatalf("the record of two staged keyslots: % x", img[l1OffStaged:l1OffStaged+12])
	}
	back := reread(t, h)
	if st := back.StagedKeyslots(); len(st) != 2 || st[0] != 2 || st[1] != 3 || back.StagedKeyslot() != 2 {
		t.Fatalf("read back: staged %v (first %d)", st, back.StagedKeyslot())
	}
	for pass, want := range map[string]int{"pw": 2, "other": 3} {
		uk, id, err := back.UnlockUnbound([]byte(pass))
		if err != nil || id != want || !bytes.Equal(uk.Bytes(), newKey) {
			t.Fatalf("UnlockUnbound(%s): keyslot %d (want %d), %v", pass, id, want, err)
		}
	}
	if _, _, err := back.UnlockUnbound([]byte("wrong")); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("UnlockUnbound with a wrong passphrase: %v", err)
	}
	t.Run("bind", func(t *testing.T) {
		b := reread(t, h)
		if err := b.BindSegmentCipher(3, ""); err != nil {
			t.Fatal(err)
		}
		for _, id := range []int{0, 1} {
			if err := b.RemoveKeyslot(id); err != nil {
				t.Fatal(err)
			}
		}
		b.RemoveCheckpoint()
		if err := b.SetDisguised(false); err != nil {
			t.Fatal(err)
		}
		f := reread(t, b)
		for pass, want := range map[string]int{"pw": 2, "other": 3} {
			vk, id, err := f.Unlock([]byte(pass))
			if err != nil || id != want || !bytes.Equal(vk.Bytes(), newKey) {
				t.Fatalf("final Unlock(%s): keyslot %d (want %d), %v", pass, id, want, err)
			}
		}
	})
	t.Run("drop one at a time", func(t *testing.T) {
		b := reread(t, h)
		if err := b.RemoveKeyslot(2); err != nil {
			t.Fatal(err)
		}
		img, _ := b.Image()
		if string(img[l1OffStaged:l1OffStaged+8]) != "DMCVTRK1" || b.StagedKeyslot() != 3 {
			t.Fatalf("one staged keyslot left: record % x, staged %v", img[l1OffStaged:l1OffStaged+12], b.StagedKeyslots())
		}
		if err := b.RemoveKeyslot(3); err != nil {
			t.Fatal(err)
		}
		if b.StagedKeyslots() != nil {
			t.Fatalf("staged keyslots after dropping both: %v", b.StagedKeyslots())
		}
	})
	t.Run("damaged mask", func(t *testing.T) {
		img, _ := h.Image()
		img[l1OffStaged+10] = 1 // keyslot 8: there is none
		binary.BigEndian.PutUint32(img[l1OffStaged+l1StagedCRCAt:], crc32.Checksum(img[l1OffStaged:l1OffStaged+l1StagedCRCAt], castagnoli))
		if _, err := Read(bytes.NewReader(img)); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("a record naming keyslot 8: %v", err)
		}
	})
}

// TestLUKS1StagedKeyRespec: a rekey to another cipher and key size
// (aes-cbc-essiv:sha256 with a 256-bit key to aes-xts-plain64 with 512
// bits): the staged keyslot is encrypted with the new cipher where the
// 512-bit layout puts it, clear of the keyslot in use; the record says
// so; binding moves every keyslot to the new layout and wipes the old
// material; dropping wipes the staged material where it is.
func TestLUKS1StagedKeyRespec(t *testing.T) {
	oldKey := bytes.Repeat([]byte{0x5c}, 32)
	ovk := NewVolumeKeyFromBytes(oldKey)
	h, err := Create(Options{Version: 1, Cipher: "aes-cbc-essiv:sha256", PBKDF: PBKDF{Type: KDFPBKDF2, Iterations: MinPBKDF2Iterations}}, ovk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	oldArea := h.Keyslots()[0]
	if err := h.SetDisguised(true); err != nil {
		t.Fatal(err)
	}
	newKey := bytes.Repeat([]byte{0xa3}, 64)
	nvk := NewVolumeKeyFromBytes(newKey)
	slot, err := h.AddUnboundKeyslotFor(nvk, []byte("pw"), oldArea.PBKDF, "aes-xts-plain64")
	if err != nil {
		t.Fatal(err)
	}
	// The 256-bit layout: keyslot 0 at [8,258), records at [2056,2064);
	// the 512-bit one: keyslot 1 at [512,1012), clear of both.
	if slot != 1 {
		t.Fatalf("staged in keyslot %d, want 1", slot)
	}
	img, _ := h.Image()
	if string(img[l1OffStaged:l1OffStaged+8]) != "DMCVTRK3" {
		t.Fatalf("the record of a new cipher and key size: %q", img[l1OffStaged:l1OffStaged+8])
	}
	back := reread(t, h)
	if back.Cipher() != "aes-cbc-essiv:sha256" || back.VolumeKeySize() != 32 {
		t.Fatalf("the staged header's data cipher %s/%d changed before the switch", back.Cipher(), back.VolumeKeySize())
	}
	ks := back.Keyslots()
	if len(ks) != 2 || ks[1].ID != 1 || ks[1].Bound || ks[1].KeySize != 64 || ks[1].Cipher != "aes-xts-plain64" || ks[1].AreaOffset != 512*512 {
		t.Fatalf("keyslots %+v", ks)
	}
	if vk, id, err := back.Unlock([]byte("pw")); err != nil || id != 0 || !bytes.Equal(vk.Bytes(), oldKey) {
		t.Fatalf("Unlock: keyslot %d, %v", id, err)
	}
	if uk, id, err := back.UnlockUnbound([]byte("pw")); err != nil || id != 1 || !bytes.Equal(uk.Bytes(), newKey) {
		t.Fatalf("UnlockUnbound: keyslot %d, %v", id, err)
	}
	if _, err := h.AddUnboundKeyslotFor(nvk, []byte("pw"), oldArea.PBKDF, "aes-xts-plain"); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("staging the key again for another cipher: %v", err)
	}
	t.Run("bind", func(t *testing.T) {
		b := reread(t, h)
		if err := b.BindSegmentCipher(1, "aes-cbc-plain"); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("binding for a cipher the key was not staged for: %v", err)
		}
		if err := b.BindSegmentCipher(1, "aes-xts-plain64"); err != nil {
			t.Fatal(err)
		}
		wiped := false
		for _, sp := range b.dirtyAfter {
			wiped = wiped || sp.off == oldArea.AreaOffset && sp.size == oldArea.AreaSize
		}
		if !wiped {
			t.Fatalf("the old keyslot's material [%d,+%d) is not wiped: %v", oldArea.AreaOffset, oldArea.AreaSize, b.dirtyAfter)
		}
		if err := b.RemoveKeyslot(0); err != nil {
			t.Fatal(err)
		}
		b.RemoveCheckpoint()
		if err := b.SetDisguised(false); err != nil {
			t.Fatal(err)
		}
		f := reread(t, b)
		if f.Cipher() != "aes-xts-plain64" || f.VolumeKeySize() != 64 || f.DataOffset() != h.DataOffset() {
			t.Fatalf("final: %s, %d bytes, data at %d", f.Cipher(), f.VolumeKeySize(), f.DataOffset())
		}
		for i, s := range f.v1.slots {
			if want := uint32(8 + 504*i); s.offset != want {
				t.Fatalf("final keyslot %d at %d, want %d (the 512-bit layout)", i, s.offset, want)
			}
		}
		if vk, id, err := f.Unlock([]byte("pw")); err != nil || id != 1 || !bytes.Equal(vk.Bytes(), newKey) {
			t.Fatalf("final Unlock: keyslot %d, %v", id, err)
		}
	})
	t.Run("drop", func(t *testing.T) {
		b := reread(t, h)
		if err := b.RemoveKeyslot(1); err != nil {
			t.Fatal(err)
		}
		if len(b.dirtyAfter) != 1 || b.dirtyAfter[0].off != 512*512 || b.dirtyAfter[0].size != 500*512 {
			t.Fatalf("dropping the staged key wipes %v, want its material at [512,1012)", b.dirtyAfter)
		}
		if err := b.SetDisguised(false); err != nil {
			t.Fatal(err)
		}
		f := reread(t, b)
		if vk, id, err := f.Unlock([]byte("pw")); err != nil || id != 0 || !bytes.Equal(vk.Bytes(), oldKey) || f.Cipher() != "aes-cbc-essiv:sha256" {
			t.Fatalf("after the drop: keyslot %d, %s, %v", id, f.Cipher(), err)
		}
	})
}
