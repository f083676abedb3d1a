package luks

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
)

// TestBackupMatchesCryptsetup: our Backup of a device is byte-identical
// to `cryptsetup luksHeaderBackup`, cryptsetup restores our backups, and
// we read and restore cryptsetup's.
func TestBackupMatchesCryptsetup(t *testing.T) {
	cs := needCryptsetup(t)
	for _, version := range []int{1, 2} {
		vk, _ := NewVolumeKey(64)
		h, err := Create(Options{Version: version, PBKDF: testPBKDF2}, vk, []byte("pw"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.AddKeyslot(vk, []byte("second"), testPBKDF2); err != nil {
			t.Fatal(err)
		}
		dev := writeImage(t, h)
		dir := t.TempDir()
		theirs := filepath.Join(dir, "theirs")
		ours := filepath.Join(dir, "ours")
		cs.ok(nil, "luksHeaderBackup", "--header-backup-file", theirs, dev)
		f, err := os.Open(dev)
		if err != nil {
			t.Fatal(err)
		}
		if err := Backup(f, ours); err != nil {
			t.Fatal(err)
		}
		f.Close()
		tb, ob := readFileT(t, theirs), readFileT(t, ours)
		if !bytes.Equal(tb, ob) {
			t.Fatalf("LUKS%d: our backup (%d bytes) differs from cryptsetup's (%d bytes)", version, len(ob), len(tb))
		}
		if st, _ := os.Stat(ours); st.Mode().Perm() != 0o400 {
			t.Errorf("backup mode %v, want 0400", st.Mode().Perm())
		}
		if err := Backup(bytes.NewReader(readFileT(t, dev)), ours); err == nil {
			t.Fatal("Backup overwrote an existing file")
		}
		// In-memory BackupImage equals the on-device backup.
		bi, err := h.BackupImage()
		if err != nil || !bytes.Equal(bi, ob) {
			t.Fatalf("BackupImage differs from Backup: %v", err)
		}
		// We read cryptsetup's backup file.
		bh := readHeader(t, theirs)
		if got, _, err := bh.Unlock([]byte("second")); err != nil || !got.Equal(vk) {
			t.Fatalf("unlock from cryptsetup backup: %v", err)
		}
		// cryptsetup restores our backup onto a blank device.
		blank := deviceFile(t, nil, h.HeaderSize()+1<<20)
		cs.ok(nil, "luksHeaderRestore", "--batch-mode", "--header-backup-file", ours, blank)
		cs.ok([]byte("pw\n"), "open", "--test-passphrase", blank)
		// We restore cryptsetup's backup onto another blank device.
		blank2 := deviceFile(t, nil, h.HeaderSize()+1<<20)
		w, err := openRW(blank2)
		if err != nil {
			t.Fatal(err)
		}
		if err := Restore(theirs, w); err != nil {
			t.Fatal(err)
		}
		w.Close()
		cs.ok([]byte("second\n"), "open", "--test-passphrase", blank2)
		if got := cs.dumpVolumeKey(blank2, writeTemp(t, "pw", []byte("pw"))); !bytes.Equal(got, vk.Bytes()) {
			t.Fatal("restored header yields a different key")
		}
		// Restore refuses a backup whose layout differs from the device's.
		vk2, _ := NewVolumeKey(32)
		other, err := Create(Options{Version: version, PBKDF: testPBKDF2, HeaderSize: 4 << 20}, vk2, []byte("x"))
		if err != nil {
			t.Fatal(err)
		}
		odev := writeImage(t, other)
		ow, _ := openRW(odev)
		if err := Restore(theirs, ow); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("restore onto a different layout: %v", err)
		}
		ow.Close()
		// And a garbage backup.
		junk := writeTemp(t, "junk", randBytes(t, 8192))
		if err := Restore(junk, ow); err == nil {
			t.Fatal("restored a garbage backup")
		}
	}
}

// TestRekeyWithUnboundKeyslot walks the rekey flow the engine uses: the
// new volume key waits in an unbound keyslot, BindSegment switches the
// data segment to it, every passphrase is re-added, the old keyslots go.
// cryptsetup checks the result at each step.
func TestRekeyWithUnboundKeyslot(t *testing.T) {
	cs := needCryptsetup(t)
	oldKey, _ := NewVolumeKey(64)
	h, err := Create(Options{PBKDF: testPBKDF2, HeaderSize: 2 << 20}, oldKey, []byte("alpha"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.AddKeyslot(oldKey, []byte("beta"), testPBKDF2); err != nil {
		t.Fatal(err)
	}
	tok := []byte(`{"type":"someone-else","keyslots":["1"],"x":1}`)
	if _, err := h.SetToken(5, tok); err != nil {
		t.Fatal(err)
	}
	dev := writeImage(t, h)
	f, err := openRW(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	newKey, _ := NewVolumeKey(64)
	passes := []string{"alpha", "beta"}
	h = readHeader(t, dev)
	oldSlots := h.Keyslots()
	var staged []int
	for _, p := range passes {
		// Unlock proves the passphrase first (the engine asks the user).
		if _, _, err := h.Unlock([]byte(p)); err != nil {
			t.Fatal(err)
		}
		id, err := h.AddUnboundKeyslot(newKey, []byte(p), testPBKDF2)
		if err != nil {
			t.Fatal(err)
		}
		staged = append(staged, id)
	}
	if err := h.Commit(f); err != nil {
		t.Fatal(err)
	}
	// Mid-run: cryptsetup still opens with the old key; we find both keys.
	if got := cs.dumpVolumeKey(dev, writeTemp(t, "a", []byte("alpha"))); !bytes.Equal(got, oldKey.Bytes()) {
		t.Fatal("mid-run: data key is not the old key")
	}
	mid := readHeader(t, dev)
	if nk, _, err := mid.UnlockUnbound([]byte("beta")); err != nil || !nk.Equal(newKey) {
		t.Fatalf("mid-run UnlockUnbound: %v", err)
	}
	ds, _ := mid.v2.digests()
	if len(ds) != 2 {
		t.Fatalf("%d digests, want 2 (both unbound keyslots share one)", len(ds))
	}
	// Finalize: bind, drop the old keyslots.
	if err := mid.BindSegment(staged[0]); err != nil {
		t.Fatal(err)
	}
	for _, k := range mid.Keyslots() {
		if !k.Bound {
			if err := mid.RemoveKeyslot(k.ID); err != nil {
				t.Fatal(err)
			}
		}
	}
	before := readFileT(t, dev)
	if err := mid.Commit(f); err != nil {
		t.Fatal(err)
	}
	for _, p := range passes {
		if got := cs.dumpVolumeKey(dev, writeTemp(t, "p", []byte(p))); !bytes.Equal(got, newKey.Bytes()) {
			t.Fatalf("after rekey %q opens a different key", p)
		}
	}
	fin := readHeader(t, dev)
	if len(fin.Keyslots()) != 2 {
		t.Fatalf("keyslots after rekey: %+v", fin.Keyslots())
	}
	ds, _ = fin.v2.digests()
	if len(ds) != 1 {
		t.Fatalf("%d digests after rekey, want 1", len(ds))
	}
	if got, ok := fin.Token(5); !ok || !jsonEqual(t, got, []byte(`{"type":"someone-else","keyslots":[],"x":1}`)) {
		t.Fatalf("foreign token after removing its keyslot: %s", got)
	}
	// The old keyslots' areas were wiped with fresh random data.
	after := readFileT(t, dev)
	for _, k := range oldSlots {
		if bytes.Equal(before[k.AreaOffset:k.AreaOffset+k.AreaSize], after[k.AreaOffset:k.AreaOffset+k.AreaSize]) {
			t.Fatalf("old keyslot %d area not wiped", k.ID)
		}
	}
	// Removing the last keyslot that opens the data is refused.
	if err := fin.RemoveKeyslot(fin.Keyslots()[0].ID); err != nil {
		t.Fatal(err)
	}
	if err := fin.RemoveKeyslot(fin.Keyslots()[0].ID); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("removing the last keyslot: %v", err)
	}
	// A wrong volume key cannot be added as a bound keyslot.
	if _, err := fin.AddKeyslot(oldKey, []byte("x"), testPBKDF2); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("AddKeyslot with a foreign key: %v", err)
	}
}

// TestRekeyToAnotherCipher: the new key of a rekey that changes the
// cipher and key size waits in an unbound keyslot encrypted as cryptsetup
// would encrypt a keyslot of the new segment (the segment cipher when
// this package runs it, else its aes-xts-plain64 fallback), and
// BindSegmentCipher switches the segment's key and cipher together;
// cryptsetup opens the result to the new key and names the new cipher.
func TestRekeyToAnotherCipher(t *testing.T) {
	cs := needCryptsetup(t)
	for _, c := range []struct {
		cipher   string
		keySize  int
		area     string
		areaSize int
	}{
		{"serpent-xts-plain64", 32, FallbackKeyslotCipher, FallbackKeyslotKeySize},
		{"aes-cbc-essiv:sha256", 32, "aes-cbc-essiv:sha256", 32},
		{"aes-xts-plain64", 32, "aes-xts-plain64", 32},
	} {
		t.Run(c.cipher, func(t *testing.T) {
			cs := cs.in(t)
			oldKey, _ := NewVolumeKey(64)
			h, err := Create(Options{PBKDF: testPBKDF2, HeaderSize: 2 << 20}, oldKey, []byte("alpha"))
			if err != nil {
				t.Fatal(err)
			}
			newKey, _ := NewVolumeKey(c.keySize)
			if _, err := h.AddUnboundKeyslotFor(newKey, []byte("alpha"), testPBKDF2, c.cipher+"-"); err == nil {
				t.Fatal("a malformed cipher was accepted")
			}
			id, err := h.AddUnboundKeyslotFor(newKey, []byte("alpha"), testPBKDF2, c.cipher)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range h.Keyslots() {
				if k.ID == id && (k.Bound || k.KeySize != c.keySize || k.Cipher != c.area || k.AreaKey != c.areaSize) {
					t.Fatalf("staged keyslot %+v, want a %d-byte key in a %s/%d area", k, c.keySize, c.area, c.areaSize)
				}
			}
			// The segment's own key cannot change cipher in place.
			if err := h.BindSegmentCipher(0, c.cipher); c.cipher != "aes-xts-plain64" && !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("changing the cipher of the bound key: %v", err)
			}
			if err := h.BindSegmentCipher(id, c.cipher); err != nil {
				t.Fatal(err)
			}
			if err := h.RemoveKeyslot(0); err != nil {
				t.Fatal(err)
			}
			if h.Cipher() != c.cipher || h.VolumeKeySize() != c.keySize {
				t.Fatalf("segment %s with a %d-byte key", h.Cipher(), h.VolumeKeySize())
			}
			dev := writeImage(t, h)
			back := readHeader(t, dev)
			if vk, _, err := back.Unlock([]byte("alpha")); err != nil || !vk.Equal(newKey) {
				t.Fatalf("reread header: %v", err)
			}
			if got := cs.dumpVolumeKey(dev, writeTemp(t, "a", []byte("alpha"))); !bytes.Equal(got, newKey.Bytes()) {
				t.Fatal("cryptsetup opens another key")
			}
			dump := cs.ok(nil, "luksDump", dev)
			if !regexp.MustCompile(`(?m)^\s*cipher:\s*` + regexp.QuoteMeta(c.cipher) + `\s*$`).MatchString(dump) {
				t.Fatalf("luksDump does not name the segment cipher %s:\n%s", c.cipher, dump)
			}
		})
	}
	if a, n := KeyslotEncryption("twofish-xts-plain64", 64); a != "aes-xts-plain64" || n != 64 {
		t.Fatalf("fallback %s/%d", a, n)
	}
	if a, n := KeyslotEncryption("aes-xts-plain64", 32); a != "aes-xts-plain64" || n != 32 {
		t.Fatalf("own cipher %s/%d", a, n)
	}
}

// TestReplaceKeyslotKeepsNumbers: at a rekey's end each new keyslot takes
// the number and the priority of the old keyslot its passphrase opened
// (ReplaceKeyslot), so tokens bound to the old numbers (a TPM2 or FIDO2
// enrollment) and key-slot= options keep working; cryptsetup opens the new
// key with each passphrase in its old keyslot and sees the token bound
// and the priority kept. An old keyslot nobody replaced is removed with
// its token binding, as before.
func TestReplaceKeyslotKeepsNumbers(t *testing.T) {
	cs := needCryptsetup(t)
	oldKey, _ := NewVolumeKey(64)
	h, err := Create(Options{PBKDF: testPBKDF2, HeaderSize: 2 << 20}, oldKey, []byte("alpha"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"beta", "gamma"} {
		if _, err := h.AddKeyslot(oldKey, []byte(p), testPBKDF2); err != nil {
			t.Fatal(err)
		}
	}
	// beta's keyslot 1: preferred, bound to a token; gamma's 2: not kept.
	ks := h.v2.sec("keyslots")
	o, _ := ks.getObject("1")
	o.set("priority", jsonRaw(2))
	ks.setObject("1", o)
	h.v2.setSec("keyslots", ks)
	if _, err := h.SetToken(3, []byte(`{"type":"systemd-tpm2","keyslots":["1"],"x":1}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := h.SetToken(4, []byte(`{"type":"other","keyslots":["2"]}`)); err != nil {
		t.Fatal(err)
	}
	dev := writeImage(t, h)
	f, err := openRW(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	h = readHeader(t, dev)
	oldSlots := h.Keyslots()
	newKey, _ := NewVolumeKey(64)
	replaces := map[int]int{} // staged -> old
	for _, p := range []string{"alpha", "beta"} {
		_, slot, err := h.Unlock([]byte(p))
		if err != nil {
			t.Fatal(err)
		}
		id, err := h.AddUnboundKeyslot(newKey, []byte(p), testPBKDF2)
		if err != nil {
			t.Fatal(err)
		}
		replaces[id] = slot
	}
	if err := h.Commit(f); err != nil {
		t.Fatal(err)
	}
	var staged []int
	for id := range replaces {
		staged = append(staged, id)
	}
	if err := h.ReplaceKeyslot(0, staged[0]); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("replacing a keyslot that still opens the data: %v", err)
	}
	if err := h.BindSegment(staged[0]); err != nil {
		t.Fatal(err)
	}
	for id, old := range replaces {
		if err := h.ReplaceKeyslot(old, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.RemoveKeyslot(2); err != nil {
		t.Fatal(err)
	}
	before := readFileT(t, dev)
	if err := h.Commit(f); err != nil {
		t.Fatal(err)
	}
	for slot, p := range []string{"alpha", "beta"} {
		kf := writeTemp(t, "p", []byte(p))
		if got := cs.dumpVolumeKey(dev, kf, "--key-slot", strconv.Itoa(slot)); !bytes.Equal(got, newKey.Bytes()) {
			t.Fatalf("%q in keyslot %d does not open the new key", p, slot)
		}
	}
	cs.fails(nil, "open", "--test-passphrase", "--key-file", writeTemp(t, "g", []byte("gamma")), dev)
	fin := readHeader(t, dev)
	var ids []int
	for _, k := range fin.Keyslots() {
		ids = append(ids, k.ID)
		if want := map[int]int{0: 1, 1: 2}[k.ID]; k.Priority != want || !k.Bound {
			t.Errorf("keyslot %d: priority %d bound %v, want priority %d, bound", k.ID, k.Priority, k.Bound, want)
		}
	}
	if !slices.Equal(ids, []int{0, 1}) {
		t.Fatalf("keyslots %v after the rekey, want [0 1]", ids)
	}
	if ds, _ := fin.v2.digests(); len(ds) != 1 {
		t.Fatalf("%d digests after the rekey, want 1", len(ds))
	}
	if got, _ := fin.Token(3); !jsonEqual(t, got, []byte(`{"type":"systemd-tpm2","keyslots":["1"],"x":1}`)) {
		t.Fatalf("the token bound to the replaced keyslot 1: %s", got)
	}
	if got, _ := fin.Token(4); !jsonEqual(t, got, []byte(`{"type":"other","keyslots":[]}`)) {
		t.Fatalf("the token of the removed keyslot 2: %s", got)
	}
	dump := cs.ok(nil, "luksDump", dev)
	if !regexp.MustCompile(`(?s)1: luks2.*?Priority:\s+preferred`).MatchString(dump) {
		t.Errorf("cryptsetup does not see keyslot 1 preferred:\n%s", dump)
	}
	// The replaced and removed keyslots' old material is wiped.
	after := readFileT(t, dev)
	for _, k := range oldSlots {
		if bytes.Equal(before[k.AreaOffset:k.AreaOffset+k.AreaSize], after[k.AreaOffset:k.AreaOffset+k.AreaSize]) {
			t.Errorf("old keyslot %d's area not wiped", k.ID)
		}
	}
	// LUKS1 keyslot numbers are places on the disk.
	h1, err := Create(Options{Version: 1, PBKDF: testPBKDF2}, oldKey, []byte("alpha"))
	if err != nil {
		t.Fatal(err)
	}
	if err := h1.ReplaceKeyslot(0, 1); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("LUKS1: %v", err)
	}
}
