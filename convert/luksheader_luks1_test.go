package convert

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/luks"
)

// The LUKS1 rekey header steps, checked by stock cryptsetup on a header
// cryptsetup itself made (luksFormat --type luks1, a second passphrase
// added with luksAddKey): after every write of the mark and of the final
// header, and inside every write of up to 8 sectors torn after each of
// its sectors (its first k sectors, or its last k, reached the disk),
// cryptsetup either does not recognise the device as LUKS at all, or
// opens it with the passphrase to the key and data offset that match the
// data (the old ones before the switch, the new ones after). The final
// header opens with the passphrase to the new key at the new offset; the
// old volume key and the passphrase that was not given do not open it.
// An aborted rekey's header opens to the old key with both passphrases.
func TestLUKSHeaderRekeyLUKS1AgainstCryptsetup(t *testing.T) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Fatal("cryptsetup is needed (make test installs it)")
	}
	for _, c := range []luks1Case{
		{bits: 512}, {bits: 256},
		// A weak cipher's volume to AES-256-XTS: in place, every keyslot
		// moved to the 512-bit layout at the switch.
		{bits: 256, from: "aes-cbc-essiv:sha256", to: "aes-xts-plain64", toBits: 512},
	} {
		for _, abort := range []bool{false, true} {
			c := c // each subtest its own copy: they run in parallel
			c.abort = abort
			t.Run(fmt.Sprintf("%dbit%s/abort=%v", c.bits, map[bool]string{true: "-" + c.from + "-to-" + c.to}[c.to != ""], abort), func(t *testing.T) {
				t.Parallel()
				rekeyLUKS1AgainstCryptsetup(t, c)
			})
		}
	}
}

// luks1Case is a LUKS1 rekey checked against cryptsetup: the volume's key
// size and cipher (from; "" is aes-xts-plain64), and the new ones (to,
// toBits; "" and 0 keep them: a gap rekey; else in place).
type luks1Case struct {
	bits     int
	from, to string
	toBits   int
	abort    bool
}

// luks1View is what cryptsetup makes of a device: not LUKS, or LUKS with
// this volume key (hex, opened with the passphrase) and payload offset.
type luks1View struct {
	luks    bool
	key     string
	payload int
}

var payloadRe = regexp.MustCompile(`(?m)^Payload offset:\s+(\d+)$`)

func cryptsetupView(t *testing.T, path, pass string) luks1View {
	t.Helper()
	if err := exec.Command("cryptsetup", "isLuks", path).Run(); err != nil {
		return luks1View{}
	}
	key, out := dumpVolumeKey(t, path, pass)
	m := payloadRe.FindStringSubmatch(out)
	if key == "" || m == nil {
		t.Fatalf("cryptsetup recognises %s as LUKS but does not open it with the passphrase:\n%s", path, out)
	}
	n, _ := strconv.Atoi(m[1])
	return luks1View{luks: true, key: key, payload: n}
}

// tornStates applies ws to base one by one and calls check on every
// state a crash can leave: after each write, and, for writes of up to 8
// sectors, with only their first or last k sectors written.
func tornStates(t *testing.T, path string, base []byte, ws []Write, check func(what string)) []byte {
	t.Helper()
	cur := append([]byte(nil), base...)
	try := func(what string, b []byte) {
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		check(what)
	}
	for i, w := range ws {
		if n := len(w.Data) / 512; n > 1 && n <= 8 {
			for k := 1; k < n; k++ {
				b := append([]byte(nil), cur...)
				copy(b[w.Off:], w.Data[:k*512])
				try(fmt.Sprintf("write %d of %d (%d bytes at %d) torn: its first %d sectors", i+1, len(ws), len(w.Data), w.Off, k), b)
				b = append(b[:0], cur...)
				copy(b[w.Off+int64((n-k)*512):], w.Data[(n-k)*512:])
				try(fmt.Sprintf("write %d of %d (%d bytes at %d) torn: its last %d sectors", i+1, len(ws), len(w.Data), w.Off, k), b)
			}
		}
		copy(cur[w.Off:], w.Data)
		try(fmt.Sprintf("after write %d of %d (%d bytes at %d)", i+1, len(ws), len(w.Data), w.Off), cur)
	}
	return cur
}

func rekeyLUKS1AgainstCryptsetup(t *testing.T, c luks1Case) {
	bits, abort := c.bits, c.abort
	from, to, toBits := c.from, c.to, c.toBits
	if from == "" {
		from = "aes-xts-plain64"
	}
	respec := to != ""
	if !respec {
		to, toBits = from, bits
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "disk")
	pw, other := filepath.Join(dir, "pw"), filepath.Join(dir, "other")
	os.WriteFile(pw, []byte("pass"), 0o600)
	os.WriteFile(other, []byte("other"), 0o600)
	if err := os.WriteFile(path, make([]byte, 8<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--cipher", from, "--key-size", strconv.Itoa(bits), "--key-file", pw, path},
		{"luksAddKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", pw, path, other},
	} {
		if out, err := exec.Command("cryptsetup", args...).CombinedOutput(); err != nil {
			t.Fatalf("cryptsetup %v: %v\n%s", args, err, out)
		}
	}
	oldHex, out := dumpVolumeKey(t, path, "pass")
	if oldHex == "" {
		t.Fatalf("no volume key:\n%s", out)
	}
	base, H, lh, ks := openDiskHeader(t, path, "pass")
	defer ks.Wipe()
	if hex.EncodeToString(ks.Bound) != oldHex || ks.Unbound != nil {
		t.Fatal("OpenLUKSImage does not give cryptsetup's volume key (and no staged one)")
	}
	if o := lh.OtherKeyslots(); len(o) != 1 || o[0] != 1 {
		t.Fatalf("other keyslots %v, want [1]", o)
	}
	newKey := make([]byte, toBits/8)
	rand.Read(newKey)
	if err := lh.StageRekey(newKey, []byte("pass"), to); err != nil {
		t.Fatal(err)
	}
	// The first free keyslot; with a 512-bit key from a 256-bit layout,
	// the first whose area in the new layout ([1016,1516) for keyslot 2)
	// is clear of keyslots 0 and 1 in use: keyslot 2 as well.
	staged := lh.Header().StagedKeyslot()
	if staged != 2 {
		t.Fatalf("the new key is staged in keyslot %d, want 2", staged)
	}
	end := lh.KeyslotsEnd()
	G := (H - min(end, H)) / 8 * 8
	// cryptsetup's LUKS1 layout: keyslot i at sector 8+i*ceil8(material);
	// the last one's material ends at 4036 (512-bit key) or 2050
	// (256-bit), then dmconvert's 4 KiB of records.
	wantG := map[int]Sectors{512: 48, 256: 2032}[bits]
	if H != 4096 || G != wantG {
		t.Fatalf("data at %d, keyslots and records end at %d: gap %d, want %d", H, end, G, wantG)
	}
	if respec {
		G = 0 // in place
	}

	// The mark: before it cryptsetup sees the old header, after it
	// nothing; never anything else.
	oldView := luks1View{luks: true, key: oldHex, payload: int(H)}
	ws, err := lh.MarkWrites(Checkpoint{Run: "r", Op: "rekey", Plan: "forward", Phase: 2})
	if err != nil {
		t.Fatal(err)
	}
	cur := tornStates(t, path, base, ws, func(what string) {
		if v := cryptsetupView(t, path, "pass"); v.luks && v != oldView {
			t.Fatalf("marking, %s: cryptsetup opens the header to the key %s... at %d (want the old header or none)", what, v.key[:8], v.payload)
		}
	})
	if v := cryptsetupView(t, path, "pass"); v.luks {
		t.Fatal("cryptsetup recognises the marked header")
	}
	if err := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", pw, path).Run(); err == nil {
		t.Fatal("cryptsetup opens the marked header")
	}
	f, _ := os.Open(path)
	cp, id, err := DiskCheckpoint(f)
	f.Close()
	if err != nil || id != IdentityDisguisedLUKS1 || cp.Phase != 2 {
		t.Fatalf("the marked disk: %v, checkpoint %+v, %v", id, cp, err)
	}

	// The journal's image gives both keys; the final header is written
	// from a header opened from it, as a resume does.
	img, err := lh.Image(Checkpoint{Run: "r", Op: "rekey", Plan: "forward", Phase: 3})
	if err != nil {
		t.Fatal(err)
	}
	lh2, ks2, err := OpenLUKSImage(img, []byte("pass"))
	if err != nil {
		t.Fatal(err)
	}
	defer ks2.Wipe()
	if hex.EncodeToString(ks2.Bound) != oldHex || !bytes.Equal(ks2.Unbound, newKey) {
		t.Fatal("the staged image does not give the old key bound and the new key staged")
	}
	if _, _, err := OpenLUKSImage(img, []byte("other")); err != nil {
		t.Fatalf("the other passphrase no longer opens the staged image's old key: %v", err)
	}
	fin := Final{Rekey: true, DataOffset: H - G, Cipher: to}
	want := luks1View{luks: true, key: hex.EncodeToString(newKey), payload: int(H - G)}
	if abort {
		fin, want = Final{DropUnbound: true}, oldView
	}
	ws, err = lh2.FinalWrites(fin)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range ws {
		if w.Off+int64(len(w.Data)) > int64(H-G)*512 {
			t.Fatalf("a final header write [%d,+%d) reaches into the data at %d", w.Off, len(w.Data), (H-G)*512)
		}
	}
	tornStates(t, path, cur, ws, func(what string) {
		if v := cryptsetupView(t, path, "pass"); v.luks && v != want {
			t.Fatalf("final header, %s: cryptsetup opens it to the key %s... at %d (want %s... at %d, or no header)", what, v.key[:8], v.payload, want.key[:8], want.payload)
		}
	})
	if v := cryptsetupView(t, path, "pass"); v != want {
		t.Fatalf("the final header: cryptsetup sees %v, want the key %s... at %d", v.luks, want.key[:8], want.payload)
	}
	if out, err := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", pw, path).CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup open --test-passphrase: %v\n%s", err, out)
	}
	oldKF := filepath.Join(dir, "old.key")
	oldKey, _ := hex.DecodeString(oldHex)
	os.WriteFile(oldKF, oldKey, 0o600)
	oldOpens := exec.Command("cryptsetup", "open", "--test-passphrase", "--volume-key-file", oldKF, path).Run() == nil
	otherOpens := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", other, path).Run() == nil
	if oldOpens != abort || otherOpens != abort {
		t.Fatalf("abort=%v: the old volume key opens the header: %v; the passphrase that was not given: %v", abort, oldOpens, otherOpens)
	}
	dump, _ := exec.Command("cryptsetup", "luksDump", path).CombinedOutput()
	enabled := regexp.MustCompile(`(?m)^Key Slot (\d): ENABLED$`).FindAllStringSubmatch(string(dump), -1)
	wantSlots := "[[Key Slot 2: ENABLED 2]]"
	if abort {
		wantSlots = "[[Key Slot 0: ENABLED 0] [Key Slot 1: ENABLED 1]]"
	}
	if fmt.Sprint(enabled) != wantSlots {
		t.Fatalf("enabled keyslots %v, want %s:\n%s", enabled, wantSlots, dump)
	}
	// The data's cipher and key size, as cryptsetup reads them.
	wantCipher, wantBits := to, toBits
	if abort {
		wantCipher, wantBits = from, bits
	}
	name, mode, _ := strings.Cut(wantCipher, "-")
	if !regexp.MustCompile(`(?m)^Cipher name:\s+`+regexp.QuoteMeta(name)+`\n`).Match(dump) ||
		!regexp.MustCompile(`(?m)^Cipher mode:\s+`+regexp.QuoteMeta(mode)+`\n`).Match(dump) ||
		!regexp.MustCompile(`(?m)^MK bits:\s+`+strconv.Itoa(wantBits)+`\n`).Match(dump) {
		t.Fatalf("abort=%v: cryptsetup does not see %s with %d bits:\n%s", abort, wantCipher, wantBits, dump)
	}
	// Our reader agrees, and nothing of the run is left: no staged key,
	// no checkpoint record, the padding after the phdr is zero again.
	fh, err := luks.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if fh.Disguised() || fh.StagedKeyslot() >= 0 {
		t.Fatalf("the final header: disguised %v, staged keyslot %d", fh.Disguised(), fh.StagedKeyslot())
	}
	f, _ = os.Open(path)
	_, _, err = DiskCheckpoint(f)
	f.Close()
	if !errors.Is(err, ErrNoCheckpoint) {
		t.Fatalf("the final header still has a checkpoint: %v", err)
	}
	final, _ := os.ReadFile(path)
	if !bytes.Equal(final[592:4096], make([]byte, 4096-592)) {
		t.Fatal("the bytes after the final phdr's fields are not zero")
	}
}

// A LUKS1 rekey that keeps two passphrases of three (--also-key-file),
// on a header stock cryptsetup made (its default 512-bit key, so the
// rekey runs in place: the data offset stays): the new key is staged in
// two free keyslots under one digest; the header image opened by the
// second passphrase alone (a resume) finishes the run; cryptsetup then
// opens the new key with both, and the third passphrase, not given, is
// gone. An abort drops both staged keyslots: all three open the old key.
func TestLUKSHeaderRekeyLUKS1KeepsSeveralPassphrases(t *testing.T) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Fatal("cryptsetup is needed (make test installs it)")
	}
	for _, abort := range []bool{false, true} {
		dir := t.TempDir()
		path := filepath.Join(dir, "disk")
		if err := os.WriteFile(path, make([]byte, 4<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		kf := func(p string) string {
			f := filepath.Join(dir, p)
			os.WriteFile(f, []byte(p), 0o600)
			return f
		}
		for _, args := range [][]string{
			{"luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--key-file", kf("pass"), path},
			{"luksAddKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", kf("pass"), path, kf("other")},
			{"luksAddKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", kf("pass"), path, kf("third")},
		} {
			if out, err := exec.Command("cryptsetup", args...).CombinedOutput(); err != nil {
				t.Fatalf("cryptsetup %v: %v\n%s", args, err, out)
			}
		}
		oldHex, _ := dumpVolumeKey(t, path, "pass")
		_, H, lh, ks := openDiskHeader(t, path, "pass")
		addOtherOpener(t, lh)
		newKey := make([]byte, len(ks.Bound))
		rand.Read(newKey)
		// The record names both staged keyslots: the second passphrase
		// alone opens the new key.
		lh2, ks2 := stageTwoAndResume(t, lh, path, newKey, lh.Crypt().Cipher)
		if st := lh.stagedSlots(); len(st) != 2 || st[0] != 3 || st[1] != 4 {
			t.Fatalf("staged keyslots %v, want [3 4] (the first free ones)", st)
		}
		if o := lh.OtherKeyslots(); len(o) != 1 || o[0] != 2 {
			t.Fatalf("other keyslots %v, want [2]", o)
		}
		if v := cryptsetupView(t, path, "pass"); v.luks {
			t.Fatal("cryptsetup recognises the marked (disguised) header")
		}
		if hex.EncodeToString(ks2.Bound) != oldHex || !bytes.Equal(ks2.Unbound, newKey) || lh2.unbound != 4 {
			t.Fatalf("the staged image opened by the second passphrase: old key %v, new key %v, staged keyslot %d (want 4)",
				hex.EncodeToString(ks2.Bound) == oldHex, bytes.Equal(ks2.Unbound, newKey), lh2.unbound)
		}
		finishStaged(t, lh2, path, H, abort, lh.KeyslotReplacements())
		want := map[string]string{"pass": hex.EncodeToString(newKey), "other": hex.EncodeToString(newKey), "third": ""}
		if abort {
			want = map[string]string{"pass": oldHex, "other": oldHex, "third": oldHex}
		}
		for p, k := range want {
			got, out := dumpVolumeKey(t, path, p)
			if got != k {
				t.Fatalf("abort=%v: passphrase %q gives volume key %q, want %q:\n%s", abort, p, got, k, out)
			}
		}
		dump, _ := exec.Command("cryptsetup", "luksDump", path).CombinedOutput()
		enabled := regexp.MustCompile(`(?m)^Key Slot \d: ENABLED$`).FindAll(dump, -1)
		if wantN := map[bool]int{false: 2, true: 3}[abort]; len(enabled) != wantN || !payloadRe.Match(dump) || payloadRe.FindStringSubmatch(string(dump))[1] != strconv.Itoa(int(H)) {
			t.Fatalf("abort=%v: %d keyslots enabled (want %d), or the payload moved from %d:\n%s", abort, len(enabled), wantN, H, dump)
		}
		ks.Wipe()
		ks2.Wipe()
	}
}

// openDiskHeader reads the LUKS header of the disk image at path and
// opens it with pass: the image, the data offset, the header and keys.
func openDiskHeader(t *testing.T, path, pass string) ([]byte, Sectors, *LUKSHeader, Keys) {
	t.Helper()
	base, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h0, err := luks.Read(bytes.NewReader(base))
	if err != nil {
		t.Fatal(err)
	}
	H := Sectors(h0.DataOffset() / 512)
	lh, ks, err := OpenLUKSImage(base[:H*512], []byte(pass))
	if err != nil {
		t.Fatal(err)
	}
	return base, H, lh, ks
}
