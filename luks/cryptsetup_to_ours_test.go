package luks

import (
	"bytes"
	"errors"
	"strconv"
	"strings"
	"testing"
)

// TestCryptsetupToOurs formats headers with cryptsetup (plus a keyslot
// added with luksAddKey and, for LUKS2, a foreign token imported with
// `cryptsetup token import`) and checks that we unlock them to the volume
// key cryptsetup reports, with the passphrase and with the key file, and
// that wrong passphrases fail with ErrWrongPassphrase.
func TestCryptsetupToOurs(t *testing.T) {
	cs := needCryptsetup(t)
	cases := []struct {
		name string
		luks int
		p    PBKDF
		args []string
	}{
		{"luks2-argon2id-auto-sector", 2, testArgon2id, nil},
		{"luks2-argon2i-512-min", 2, testArgon2i, []string{"--sector-size", "512", "--offset", strconv.FormatInt(MinHeaderSize(2, 64, 0)/512, 10)}},
		{"luks2-pbkdf2-4096-md64k", 2, testPBKDF2, []string{"--sector-size", "4096", "--luks2-metadata-size", "64k", "--offset", "8192"}},
		{"luks2-essiv256-sha512", 2, PBKDF{Type: KDFPBKDF2, Iterations: 1000}, []string{"--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--hash", "sha512", "--sector-size", "512"}},
		{"luks2-xts256-argon2id-2048", 2, testArgon2id, []string{"--key-size", "256", "--sector-size", "2048", "--label", "lbl", "--subsystem", "sub"}},
		{"luks1-default", 1, testPBKDF2, nil},
		{"luks1-essiv-sha1", 1, testPBKDF2, []string{"--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--hash", "sha1"}},
		{"luks1-xts-sha512-min", 1, testPBKDF2, []string{"--hash", "sha512", "--offset", strconv.FormatInt(MinHeaderSize(1, 64, 0)/512, 10)}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cs := cs.in(t)
			dev := deviceFile(t, nil, 20<<20)
			pass := []byte("format pass")
			pw := writeTemp(t, "pw", pass)
			args := append([]string{"luksFormat", "--batch-mode", "--type", "luks" + strconv.Itoa(tc.luks), "--key-file", pw}, cryptsetupPBKDFArgs(tc.p)...)
			args = append(args, tc.args...)
			cs.ok(nil, append(args, dev)...)
			kf := binaryKeyFile(t, 64)
			kfPath := writeTemp(t, "kf", kf)
			add := append([]string{"luksAddKey", "--batch-mode", "--key-file", pw}, cryptsetupPBKDFArgs(tc.p)...)
			if _, err := runTool(t, nil, cs.path, append(add, dev, kfPath)...); err != nil {
				if tc.luks == 2 && strings.Contains(tc.name, "min") {
					// A minimum header has room for one keyslot only.
					kf = nil
				} else {
					t.Fatalf("luksAddKey: %v", err)
				}
			}
			var token []byte
			if tc.luks == 2 {
				token = []byte(`{"type":"example-foreign","keyslots":["0"],"nested":{"a":[1,2,{"b":null}],"s":"x/y<&>\u00e9"},"num":12345678901234567890}`)
				jf := writeTemp(t, "tok.json", token)
				cs.ok(nil, "token", "import", "--json-file", jf, "--token-id", "3", dev)
			}
			want := cs.dumpVolumeKey(dev, pw)

			h := readHeader(t, dev)
			if h.Version() != tc.luks {
				t.Fatalf("version %d, want %d", h.Version(), tc.luks)
			}
			vk, slot, err := h.Unlock(pass)
			if err != nil || slot != 0 || !bytes.Equal(vk.Bytes(), want) {
				t.Fatalf("unlock with passphrase: slot %d, err %v", slot, err)
			}
			if kf != nil {
				vk2, slot, err := h.Unlock(kf)
				if err != nil || slot != 1 || !vk2.Equal(vk) {
					t.Fatalf("unlock with key file: slot %d, err %v", slot, err)
				}
			}
			for _, wrong := range [][]byte{[]byte("format pas"), append(append([]byte{}, pass...), '\n'), {}} {
				if _, _, err := h.Unlock(wrong); !errors.Is(err, ErrWrongPassphrase) {
					t.Fatalf("unlock with wrong passphrase %q: %v, want ErrWrongPassphrase", wrong, err)
				}
			}
			if err := h.VerifyVolumeKey(vk); err != nil {
				t.Fatal(err)
			}
			if tc.luks == 2 {
				got, ok := h.Token(3)
				if !ok || !jsonEqual(t, got, token) {
					t.Fatalf("token 3 = %s, want %s", got, token)
				}
				if strings.Contains(tc.name, "lbl") && (h.Label() != "lbl" || h.Subsystem() != "sub") {
					t.Fatalf("label %q subsystem %q", h.Label(), h.Subsystem())
				}
			}
			// Sector size as cryptsetup chose it (4096 for image files
			// unless given; LUKS1 always 512).
			dump := cs.ok(nil, "luksDump", dev)
			if tc.luks == 2 && !strings.Contains(dump, "sector: "+strconv.Itoa(h.SectorSize())+" [bytes]") {
				t.Fatalf("sector size %d not in luksDump:\n%s", h.SectorSize(), dump)
			}
			if tc.luks == 1 && h.SectorSize() != 512 {
				t.Fatalf("LUKS1 sector size %d", h.SectorSize())
			}
			// Our Image of an unchanged cryptsetup header is byte-identical
			// to cryptsetup's header area: same binary headers, salts and
			// checksums, the same compact JSON text, the same material.
			img, err := h.Image()
			if err != nil {
				t.Fatal(err)
			}
			disk := readFileT(t, dev)[:len(img)]
			if tc.luks == 1 {
				disk = disk[:h.v1.materialEnd()]
				img = img[:h.v1.materialEnd()]
			}
			if !bytes.Equal(img, disk) {
				for i := range img {
					if img[i] != disk[i] {
						t.Fatalf("our image of cryptsetup's header differs first at byte %d", i)
					}
				}
			}
		})
	}
}

// TestCryptsetupUnbound reads an unbound keyslot made by
// `cryptsetup luksAddKey --unbound` and checks the reverse: an unbound
// keyslot we add is seen and dumped by cryptsetup.
func TestCryptsetupUnbound(t *testing.T) {
	cs := needCryptsetup(t)
	dev := deviceFile(t, nil, 20<<20)
	pw := writeTemp(t, "pw", []byte("bound"))
	cs.ok(nil, append(append([]string{"luksFormat", "--batch-mode", "--type", "luks2", "--key-file", pw}, cryptsetupPBKDFArgs(testPBKDF2)...), dev)...)
	newKey := randBytes(t, 32)
	nk := writeTemp(t, "newvk", newKey)
	upw := writeTemp(t, "upw", []byte("unbound"))
	cs.ok(nil, append(append([]string{"luksAddKey", "--batch-mode", "--unbound", "--key-size", "256", "--volume-key-file", nk}, cryptsetupPBKDFArgs(testPBKDF2)...), dev, upw)...)

	h := readHeader(t, dev)
	ks := h.Keyslots()
	if len(ks) != 2 || !ks[0].Bound || ks[1].Bound || ks[1].KeySize != 32 {
		t.Fatalf("keyslots %+v", ks)
	}
	if _, _, err := h.Unlock([]byte("unbound")); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("Unlock (bound only) with the unbound passphrase: %v", err)
	}
	uk, slot, err := h.UnlockUnbound([]byte("unbound"))
	if err != nil || slot != 1 || !bytes.Equal(uk.Bytes(), newKey) {
		t.Fatalf("UnlockUnbound: slot %d err %v", slot, err)
	}

	// Ours: add an unbound keyslot, commit, let cryptsetup dump it.
	vk, _, err := h.Unlock([]byte("bound"))
	if err != nil {
		t.Fatal(err)
	}
	ours, _ := NewVolumeKey(64)
	id, err := h.AddUnboundKeyslot(ours, []byte("ours unbound"), testArgon2id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.AddUnboundKeyslot(vk, []byte("x"), testPBKDF2); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("AddUnboundKeyslot with the segment key: %v", err)
	}
	commitFile(t, h, dev)
	dump := cs.ok(nil, "luksDump", dev)
	if !strings.Contains(dump, strconv.Itoa(id)+": luks2 (unbound)") {
		t.Fatalf("cryptsetup does not show keyslot %d as unbound:\n%s", id, dump)
	}
	opw := writeTemp(t, "opw", []byte("ours unbound"))
	out := writeTemp(t, "unbound.key", nil)
	cs.ok(nil, "luksDump", "--unbound", "--batch-mode", "--key-slot", strconv.Itoa(id), "--key-file", opw, "--volume-key-file", out+".new", dev)
	if got := readFileT(t, out+".new"); !bytes.Equal(got, ours.Bytes()) {
		t.Fatalf("cryptsetup dumps a different unbound key")
	}
	cs.ok([]byte("bound\n"), "open", "--test-passphrase", dev)
}

func commitFile(t testing.TB, h *Header, path string) {
	t.Helper()
	f, err := openRW(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := h.Commit(f); err != nil {
		t.Fatalf("Commit: %v", err)
	}
}
