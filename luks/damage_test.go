package luks

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// TestDamagedCopies: a damaged primary or secondary LUKS2 metadata copy is
// detected and reported, the good copy is used, cryptsetup agrees, and the
// next write repairs both.
func TestDamagedCopies(t *testing.T) {
	cs := needCryptsetup(t)
	vk, _ := NewVolumeKey(64)
	h, err := Create(Options{PBKDF: testPBKDF2, HeaderSize: 1 << 20, Label: "damage"}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	good, _ := h.Image()
	md := int(h.MetadataSize())
	cases := []struct {
		name    string
		damage  func(b []byte)
		bad     int // index of the copy that must be reported bad
		errWant error
	}{
		{"primary-json-byte", func(b []byte) { b[4096+10] ^= 0x20 }, 0, ErrCorrupt},
		{"primary-checksum", func(b []byte) { b[offCsum] ^= 1 }, 0, ErrCorrupt},
		{"primary-magic-zeroed", func(b []byte) { clear(b[:4096]) }, 0, ErrNotLUKS},
		{"secondary-json-byte", func(b []byte) { b[md+4096+20] ^= 0x01 }, 1, ErrCorrupt},
		{"secondary-label", func(b []byte) { b[md+offLabel] = 'X' }, 1, ErrCorrupt},
		{"secondary-zeroed", func(b []byte) { clear(b[md : 2*md]) }, 1, ErrNotLUKS},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cs := cs.in(t)
			img := append([]byte{}, good...)
			tc.damage(img)
			r, err := Read(bytes.NewReader(img))
			if err != nil {
				t.Fatalf("Read: %v", err)
			}
			c := r.Copies()
			if c[tc.bad].Valid || !errors.Is(c[tc.bad].Err, tc.errWant) {
				t.Fatalf("bad copy %d reported %+v, want invalid with %v", tc.bad, c[tc.bad], tc.errWant)
			}
			if !c[1-tc.bad].Valid || !c[1-tc.bad].Used || c[tc.bad].Used {
				t.Fatalf("good copy not used: %+v", c)
			}
			if r.Label() != "damage" {
				t.Fatalf("label %q", r.Label())
			}
			if got, _, err := r.Unlock([]byte("pw")); err != nil || !got.Equal(vk) {
				t.Fatalf("unlock: %v", err)
			}
			dev := deviceFile(t, img, 1<<20)
			// cryptsetup reads the good copy too (and repairs the bad one).
			cs.ok([]byte("pw\n"), "open", "--test-passphrase", dev)
			// Our next metadata write repairs both copies.
			f, err := openRW(dev)
			if err != nil {
				t.Fatal(err)
			}
			back := readHeader(t, dev)
			if err := back.WriteMetadata(f); err != nil {
				t.Fatal(err)
			}
			f.Close()
			fixed := readHeader(t, dev)
			for i, c := range fixed.Copies() {
				if !c.Valid || c.Err != nil {
					t.Fatalf("after rewrite copy %d: %+v", i, c)
				}
			}
		})
	}
	t.Run("both-damaged", func(t *testing.T) {
		img := append([]byte{}, good...)
		img[4096+10] ^= 0x20
		img[md+4096+10] ^= 0x20
		if _, err := Read(bytes.NewReader(img)); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Read with both copies damaged: %v, want ErrCorrupt", err)
		}
	})
	t.Run("stale-secondary", func(t *testing.T) {
		// Primary written with a newer seqid, secondary still old (a crash
		// between the two writes): the newer primary wins, the secondary
		// is reported stale.
		img := append([]byte{}, good...)
		h2, _ := Read(bytes.NewReader(img))
		if err := h2.SetCheckpoint([]byte("new")); err != nil {
			t.Fatal(err)
		}
		h2.BumpSeqID()
		p, _ := h2.MetadataImage()
		copy(img, p[:md])
		r, err := Read(bytes.NewReader(img))
		if err != nil {
			t.Fatal(err)
		}
		if cp, err := r.Checkpoint(); err != nil || string(cp) != "new" || r.SeqID() != 2 {
			t.Fatalf("checkpoint %q seqid %d %v", cp, r.SeqID(), err)
		}
		c := r.Copies()
		if !c[0].Used || c[1].Err == nil || !c[1].Valid {
			t.Fatalf("copies %+v", c)
		}
		// And the reverse: only the secondary got the new version.
		img = append([]byte{}, good...)
		copy(img[md:], p[md:])
		r, err = Read(bytes.NewReader(img))
		if err != nil {
			t.Fatal(err)
		}
		if cp, _ := r.Checkpoint(); string(cp) != "new" || !r.Copies()[1].Used {
			t.Fatalf("newer secondary not used: %q %+v", cp, r.Copies())
		}
	})
	t.Run("truncated", func(t *testing.T) {
		for _, n := range []int{0, 100, 4095, 4096, md + 100, 2 * md, 2*md + 1000} {
			if _, err := Read(bytes.NewReader(good[:n])); err == nil {
				t.Fatalf("Read of %d bytes succeeded", n)
			}
		}
	})
}

// TestLUKS1Damage: a LUKS1 header has no copy, so damage to the phdr or
// a keyslot is an error or a failed unlock, never a wrong key.
func TestLUKS1Damage(t *testing.T) {
	vk, _ := NewVolumeKey(32)
	h, err := Create(Options{Version: 1, Cipher: "aes-xts-plain64", PBKDF: testPBKDF2}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	img, _ := h.Image()
	bad := append([]byte{}, img...)
	binary.BigEndian.PutUint32(bad[l1OffKeyblock+44:], 3999) // stripes
	if _, err := Read(bytes.NewReader(bad)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("bad stripes: %v", err)
	}
	bad = append([]byte{}, img...)
	bad[4096+100] ^= 1 // keyslot 0 material
	r, err := Read(bytes.NewReader(bad))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.Unlock([]byte("pw")); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("unlock of damaged material: %v", err)
	}
}
