package convert

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/luks"
)

// The key OpenLUKSImage returns is the header's volume key, and it stays
// intact after the call (it was once the luks key's own buffer, zeroed by
// a deferred Wipe: resume then rebuilt the helper with an all-zero key).
func TestOpenLUKSImageReturnsTheKey(t *testing.T) {
	for _, version := range []int{1, 2} {
		key := bytes.Repeat([]byte{0x5a, 0xa5}, 32)
		vk := luks.NewVolumeKeyFromBytes(key)
		o := luks.Options{Version: version, HeaderSize: 4 << 20, PBKDF: luks.PBKDF{Type: luks.KDFPBKDF2, Iterations: luks.MinPBKDF2Iterations}}
		if version == 1 {
			o.HeaderSize = 2 << 20
		}
		h, err := luks.Create(o, vk, []byte("pass"))
		vk.Wipe()
		if err != nil {
			t.Fatal(err)
		}
		lh, err := NewLUKSHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		img, err := lh.Image(Checkpoint{Run: "r"})
		if err != nil {
			t.Fatal(err)
		}
		_, ks, err := OpenLUKSImage(img, []byte("pass"))
		if err != nil {
			t.Fatal(err)
		}
		got := ks.Bound
		got2 := append([]byte(nil), got...)
		if !bytes.Equal(got, key) || !bytes.Equal(got2, key) {
			t.Fatalf("LUKS%d: OpenLUKSImage returned %x, want %x", version, got, key)
		}
		if _, _, err := OpenLUKSImage(img, []byte("wrong")); !errors.Is(err, ErrWrongPassphrase) {
			t.Fatalf("LUKS%d: wrong passphrase gave %v", version, err)
		}
	}
}

// applyWrites writes ws into the file at path.
func applyWrites(t *testing.T, path string, ws []Write) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, w := range ws {
		if _, err := f.WriteAt(w.Data, w.Off); err != nil {
			t.Fatal(err)
		}
	}
}

// dumpVolumeKey asks cryptsetup for the volume key of the LUKS header in
// path, opened with pass.
func dumpVolumeKey(t *testing.T, path, pass string) (string, string) {
	t.Helper()
	kf := filepath.Join(t.TempDir(), "kf")
	os.WriteFile(kf, []byte(pass), 0o600)
	out, err := exec.Command("cryptsetup", "luksDump", "--batch-mode", "--dump-volume-key", "--key-file", kf, path).CombinedOutput()
	if err != nil {
		return "", string(out)
	}
	var hexKey strings.Builder
	in := false
	for _, l := range strings.Split(string(out), "\n") {
		switch {
		case strings.HasPrefix(l, "MK dump:"):
			in = true
			l = strings.TrimPrefix(l, "MK dump:")
		case in && !strings.HasPrefix(l, "\t") && !strings.HasPrefix(l, " "):
			in = false
		}
		if in {
			hexKey.WriteString(strings.ReplaceAll(strings.TrimSpace(l), " ", ""))
		}
	}
	return hexKey.String(), string(out)
}

// The rekey header steps, checked by stock cryptsetup: the marked header
// with the staged key is refused (requirement); the final header opens
// with the passphrase to the new key at the new data offset, with the new
// cipher and key size in the segment and the keyslot, and the keyslot of
// a passphrase that was not given is gone; an aborted rekey's header
// opens to the old key with its cipher and keyslots intact.
func TestLUKSHeaderRekeyAgainstCryptsetup(t *testing.T) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Fatal("cryptsetup is needed (make test installs it)")
	}
	for _, c := range []struct {
		abort  bool
		cipher string // "": unchanged
		keyLen int
		// The new keyslot's area encryption: the new cipher when the
		// luks package runs it, else cryptsetup's fallback.
		area    string
		areaLen int
	}{
		{false, "", 64, "aes-xts-plain64", 64},
		{true, "", 64, "aes-xts-plain64", 64},
		{false, "serpent-xts-plain64", 32, "aes-xts-plain64", 64},
		{true, "serpent-xts-plain64", 32, "aes-xts-plain64", 64},
		{false, "aes-cbc-essiv:sha256", 32, "aes-cbc-essiv:sha256", 32},
		{false, "aes-xts-plain64", 32, "aes-xts-plain64", 32},
	} {
		t.Logf("abort=%v cipher=%q key=%d bits", c.abort, c.cipher, c.keyLen*8)
		rekeyHeaderAgainstCryptsetup(t, c.abort, c.cipher, c.keyLen, c.area, c.areaLen)
	}
}

func rekeyHeaderAgainstCryptsetup(t *testing.T, abort bool, cipher string, keyLen int, area string, areaLen int) {
	{
		oldKey := bytes.Repeat([]byte{0x11}, 64)
		newKey := bytes.Repeat([]byte{0x22}, keyLen)
		path, img0 := luks2TestDisk(t, oldKey, "pass", "other")
		lh, ks, err := OpenLUKSImage(img0, []byte("pass"))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ks.Bound, oldKey) || ks.Unbound != nil {
			t.Fatalf("keys before staging: %x / %x", ks.Bound, ks.Unbound)
		}
		if o := lh.OtherKeyslots(); len(o) != 1 || o[0] != 1 {
			t.Fatalf("other keyslots %v, want [1]", o)
		}
		newCipher := cipher
		if newCipher == "" {
			newCipher = "aes-xts-plain64"
		}
		if err := lh.StageRekey(newKey, []byte("pass"), newCipher); err != nil {
			t.Fatal(err)
		}
		for _, k := range lh.Header().Keyslots() {
			if !k.Bound && (k.KeySize != keyLen || k.Cipher != area || k.AreaKey != areaLen) {
				t.Fatalf("staged keyslot: %d-byte key, area %s/%d; want %d, %s/%d", k.KeySize, k.Cipher, k.AreaKey, keyLen, area, areaLen)
			}
		}
		end := lh.KeyslotsEnd()
		if end == 0 || end >= 16<<20/512 {
			t.Fatalf("keyslots end at sector %d", end)
		}
		ws, err := lh.MarkWrites(Checkpoint{Run: "r", Phase: 2})
		if err != nil {
			t.Fatal(err)
		}
		applyWrites(t, path, ws)
		// (A requirement blocks activation; luksDump still reads it.)
		if dump, _ := exec.Command("cryptsetup", "luksDump", path).CombinedOutput(); !strings.Contains(string(dump), "dmconvert") {
			t.Fatalf("luksDump of the marked header shows no dmconvert requirement:\n%s", dump)
		}
		// The journal's image opens to both keys.
		img, err := lh.Image(Checkpoint{Run: "r"})
		if err != nil {
			t.Fatal(err)
		}
		lh2, ks2, err := OpenLUKSImage(img, []byte("pass"))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ks2.Bound, oldKey) || !bytes.Equal(ks2.Unbound, newKey) {
			t.Fatal("the staged image does not give the old key bound and the new key unbound")
		}
		gap := Sectors(4 << 20 / 512)
		off := Sectors(16<<20/512) - gap
		if end > off {
			t.Fatalf("keyslots end at %d, past the new data offset %d", end, off)
		}
		fin := Final{Rekey: true, DataOffset: off, Cipher: cipher}
		if abort {
			fin = Final{DropUnbound: true}
		}
		ws, err = lh2.FinalWrites(fin)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range ws {
			if w.Off+int64(len(w.Data)) > int64(off)*512 {
				t.Fatalf("a final header write [%d,+%d) reaches into the data at %d", w.Off, len(w.Data), off*512)
			}
		}
		applyWrites(t, path, ws)
		got, out := dumpVolumeKey(t, path, "pass")
		want := hex.EncodeToString(newKey)
		if abort {
			want = hex.EncodeToString(oldKey)
		}
		if got != want {
			t.Fatalf("abort=%v: cryptsetup gives volume key %s, want %s:\n%s", abort, got, want, out)
		}
		dump, _ := exec.Command("cryptsetup", "luksDump", path).CombinedOutput()
		wantOff := fmt.Sprintf("offset: %d [bytes]", off*512)
		if abort {
			wantOff = fmt.Sprintf("offset: %d [bytes]", 16<<20)
		}
		if !strings.Contains(string(dump), wantOff) || strings.Contains(string(dump), "dmconvert") {
			t.Fatalf("abort=%v: luksDump lacks %q or still shows the marks:\n%s", abort, wantOff, dump)
		}
		// The segment's cipher, and the one keyslot's key and area.
		segCipher, ksKey, ksArea, ksAreaKey := newCipher, keyLen, area, areaLen
		if abort {
			segCipher, ksKey, ksArea, ksAreaKey = "aes-xts-plain64", 64, "aes-xts-plain64", 64
		}
		for _, re := range []string{
			`(?m)^Data segments:\n(?:[ \t]+.*\n)*?[ \t]+cipher:[ \t]+` + regexp.QuoteMeta(segCipher) + `\n`,
			`(?m)^Keyslots:\n[ \t]+\d+: luks2\n[ \t]+Key:[ \t]+` + fmt.Sprint(ksKey*8) + ` bits\n(?:[ \t]+.*\n)*?[ \t]+Cipher:[ \t]+` + regexp.QuoteMeta(ksArea) + `\n[ \t]+Cipher key:[ \t]+` + fmt.Sprint(ksAreaKey*8) + ` bits\n`,
		} {
			if !regexp.MustCompile(re).Match(dump) {
				t.Fatalf("abort=%v: luksDump does not match %s:\n%s", abort, re, dump)
			}
		}
		kf := filepath.Join(t.TempDir(), "pass")
		os.WriteFile(kf, []byte("pass"), 0o600)
		if out, err := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", kf, path).CombinedOutput(); err != nil {
			t.Fatalf("abort=%v: cryptsetup open --test-passphrase: %v\n%s", abort, err, out)
		}
		_, other := dumpVolumeKey(t, path, "other")
		otherOpens := !strings.Contains(other, "No key available")
		if otherOpens == !abort {
			t.Fatalf("abort=%v: the passphrase that was not given opens the header: %v\n%s", abort, otherOpens, other)
		}
		ks.Wipe()
		ks2.Wipe()
	}
}

// A rekey that keeps two passphrases (the one given and one more, with
// --also-key-file): the new key gets a keyslot opened by each; the header
// image opened with the second one alone (a resume) finishes the run;
// cryptsetup then opens the new key with both, and the third passphrase,
// not given, is gone. An abort drops both staged keyslots.
func TestLUKSHeaderRekeyKeepsSeveralPassphrases(t *testing.T) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Fatal("cryptsetup is needed (make test installs it)")
	}
	for _, abort := range []bool{false, true} {
		oldKey := bytes.Repeat([]byte{0x11}, 64)
		newKey := bytes.Repeat([]byte{0x33}, 64)
		path, _ := luks2TestDisk(t, oldKey, "pass", "other", "third")
		// "other"'s keyslot 1 is preferred and bound to a token, as a
		// TPM2 enrollment is; "third"'s keyslot 2 to another.
		for _, args := range [][]string{
			{"config", "--priority", "prefer", "--key-slot", "1", path},
			{"token", "import", "--json-file", writeTestFile(t, `{"type":"enrollment","keyslots":["1"]}`), path},
			{"token", "import", "--json-file", writeTestFile(t, `{"type":"other","keyslots":["2"]}`), path},
		} {
			if out, err := exec.Command("cryptsetup", args...).CombinedOutput(); err != nil {
				t.Fatalf("cryptsetup %v: %v\n%s", args, err, out)
			}
		}
		disk, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		img0 := disk[:16<<20]
		lh, ks, err := OpenLUKSImage(img0, []byte("pass"))
		if err != nil {
			t.Fatal(err)
		}
		addOtherOpener(t, lh)
		if o := lh.OtherKeyslots(); len(o) != 1 || o[0] != 2 {
			t.Fatalf("other keyslots %v, want [2]", o)
		}
		// The plan names the token that stops working with keyslot 2.
		if n, want := OtherKeyslotsNote(lh), "keyslot 2 is removed (their passphrases were not given); keyslot 2 is bound to token 1 (other): enroll it again afterwards (systemd-cryptenroll)"; n != want {
			t.Fatalf("OtherKeyslotsNote:\n got %q\nwant %q", n, want)
		}
		lh2, ks2 := stageTwoAndResume(t, lh, path, newKey, "aes-xts-plain64")
		if st := lh.stagedSlots(); len(st) != 2 {
			t.Fatalf("staged keyslots %v, want two", st)
		}
		if o := lh.OtherKeyslots(); len(o) != 1 || o[0] != 2 {
			t.Fatalf("other keyslots after staging %v, want [2]", o)
		}
		if !bytes.Equal(ks2.Bound, oldKey) || !bytes.Equal(ks2.Unbound, newKey) {
			t.Fatal("the staged image opened by the second passphrase does not give the old key bound and the new key unbound")
		}
		// The journal keeps the numbers the plan's staging gave (Spec).
		r := lh.KeyslotReplacements()
		for _, st := range lh.stagedSlots() {
			want := 1 // "other"'s
			if st == lh.unbound {
				want = 0 // "pass"'s
			}
			if old, ok := r[st]; !ok || old != want || len(r) != 2 {
				t.Fatalf("keyslot replacements %v: staged keyslot %d should take %d's number", r, st, want)
			}
		}
		finishStaged(t, lh2, path, Sectors(16<<20/512)-4<<20/512, abort, lh.KeyslotReplacements())
		want := map[string][]byte{"pass": newKey, "other": newKey, "third": nil}
		if abort {
			want = map[string][]byte{"pass": oldKey, "other": oldKey, "third": oldKey}
		}
		for p, k := range want {
			got, out := dumpVolumeKey(t, path, p)
			if k == nil {
				if !strings.Contains(out, "No key available") {
					t.Fatalf("abort=%v: passphrase %q, not given, still opens the header:\n%s", abort, p, out)
				}
				continue
			}
			if got != hex.EncodeToString(k) {
				t.Fatalf("abort=%v: passphrase %q gives volume key %s, want %x:\n%s", abort, p, got, k, out)
			}
		}
		dump, _ := exec.Command("cryptsetup", "luksDump", path).CombinedOutput()
		slots := regexp.MustCompile(`(?m)^[ \t]+\d+: luks2$`).FindAll(dump, -1)
		if wantN := map[bool]int{false: 2, true: 3}[abort]; len(slots) != wantN || strings.Contains(string(dump), "dmconvert") {
			t.Fatalf("abort=%v: %d keyslots (want %d), or marks left:\n%s", abort, len(slots), wantN, dump)
		}
		// Each passphrase kept is in the keyslot it was in, "other"'s
		// still preferred and bound to its token; the token of the
		// removed keyslot 2 is bound to nothing.
		for slot, p := range []string{"pass", "other"} {
			kf := writeTestFile(t, p)
			if out, err := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-slot", strconv.Itoa(slot), "--key-file", kf, path).CombinedOutput(); err != nil {
				t.Fatalf("abort=%v: %q does not open keyslot %d: %v\n%s", abort, p, slot, err, out)
			}
		}
		tokenSlots := regexp.MustCompile(`(?m)^\s+(\d+): (\S+)\n((?:\s+Keyslot:\s+\d+\n)?)`).FindAllStringSubmatch(string(dump[bytes.Index(dump, []byte("Tokens:")):bytes.Index(dump, []byte("Digests:"))]), -1)
		got := map[string]string{}
		for _, m := range tokenSlots {
			got[m[2]] = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(m[3]), "Keyslot:"))
		}
		wantTokens := map[string]string{"enrollment": "1", "other": ""}
		if abort {
			wantTokens["other"] = "2"
		}
		if !maps.Equal(got, wantTokens) || !regexp.MustCompile(`(?s)\n\s+1: luks2.*?Priority:\s+preferred`).Match(dump) {
			t.Fatalf("abort=%v: tokens %v (want %v), or keyslot 1 not preferred:\n%s", abort, got, wantTokens, dump)
		}
		ks.Wipe()
		ks2.Wipe()
	}
}

// writeTestFile writes s to a new temporary file and returns its path.
func writeTestFile(t *testing.T, s string) string {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "f")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

// luks2TestDisk writes a file holding a LUKS2 header (16 MiB, cheap
// PBKDF2) for volume key key with one keyslot per passphrase, in order,
// and 8 MiB of data area; it returns the file and the header image.
func luks2TestDisk(t *testing.T, key []byte, passes ...string) (string, []byte) {
	t.Helper()
	vk := luks.NewVolumeKeyFromBytes(key)
	defer vk.Wipe()
	kdf := luks.PBKDF{Type: luks.KDFPBKDF2, Iterations: luks.MinPBKDF2Iterations}
	h, err := luks.Create(luks.Options{Version: 2, HeaderSize: 16 << 20, PBKDF: kdf}, vk, []byte(passes[0]))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range passes[1:] {
		if _, err := h.AddKeyslot(vk, []byte(p), kdf); err != nil {
			t.Fatal(err)
		}
	}
	img, err := h.Image()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(path, append(img, make([]byte, 8<<20)...), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, img
}

// stageTwoAndResume stages newKey (cipher) in lh for "pass" and for
// "other" (addOtherOpener), writes the mark to the disk image at path,
// and opens the header image the journal would keep with "other" alone,
// as a resume given only that passphrase does.
func stageTwoAndResume(t *testing.T, lh *LUKSHeader, path string, newKey []byte, cipher string) (*LUKSHeader, Keys) {
	t.Helper()
	if err := lh.StageRekey(newKey, []byte("pass"), cipher); err != nil {
		t.Fatal(err)
	}
	if err := lh.StageRekeyAlso(newKey, []byte("other"), 0, cipher); err != nil {
		t.Fatal(err)
	}
	ws, err := lh.MarkWrites(Checkpoint{Run: "r", Phase: 2})
	if err != nil {
		t.Fatal(err)
	}
	applyWrites(t, path, ws)
	img, err := lh.Image(Checkpoint{Run: "r"})
	if err != nil {
		t.Fatal(err)
	}
	lh2, ks2, err := OpenLUKSImage(img, []byte("other"))
	if err != nil {
		t.Fatal(err)
	}
	return lh2, ks2
}

// finishStaged writes lh's final header to the disk image at path: the
// rekey's, with the data at off, or the abort's.
func finishStaged(t *testing.T, lh *LUKSHeader, path string, off Sectors, abort bool, keyslots map[int]int) {
	t.Helper()
	fin := Final{Rekey: true, DataOffset: off, Keyslots: keyslots}
	if abort {
		fin = Final{DropUnbound: true}
	}
	ws, err := lh.FinalWrites(fin)
	if err != nil {
		t.Fatal(err)
	}
	applyWrites(t, path, ws)
}

// addOtherOpener gives lh (opened by "pass", keyslot 0) the further
// passphrase "other" (keyslot 1), after checking that one that opens
// nothing and "pass" again are refused.
func addOtherOpener(t *testing.T, lh *LUKSHeader) {
	t.Helper()
	if _, err := lh.AddOpener([]byte("nope")); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("a passphrase that opens nothing: %v, want ErrWrongPassphrase", err)
	}
	if _, err := lh.AddOpener([]byte("pass")); err == nil || !strings.Contains(err.Error(), "keyslot 0") {
		t.Fatalf("the main passphrase given again: %v, want a refusal naming keyslot 0", err)
	}
	if slot, err := lh.AddOpener([]byte("other")); err != nil || slot != 1 {
		t.Fatalf("AddOpener(other) = %d, %v; want keyslot 1", slot, err)
	}
}
