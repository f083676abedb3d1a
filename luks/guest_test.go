//go:build linux

package luks

// Real-kernel tests, run inside the test VM (testvm): there cryptsetup
// can activate devices, which the host cannot (no device-mapper). They
// check what host tests cannot: that cryptsetup activates our headers
// with exactly our volume key, that the dmconvert requirement blocks
// activation, and that a disguised LUKS1 header is not opened.

import (
	"encoding/hex"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/testvm"
)

const guestDiskSize = 64 << 20

func TestVM(t *testing.T) {
	testvm.RunTestsInGuest(t, testvm.Options{
		Disks: []testvm.Disk{{Size: guestDiskSize}},
	})
}

// guestDisk returns the first guest disk, opened read-write.
func guestDisk(t *testing.T) (string, *os.File) {
	t.Helper()
	testvm.RequireGuest(t)
	disks := testvm.GuestDisks()
	if len(disks) < 1 {
		t.Fatal("no guest disk")
	}
	f, err := os.OpenFile(disks[0], os.O_RDWR|os.O_SYNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return disks[0], f
}

// closeMapping removes a mapping left by a failed test.
func closeMapping(cs cryptsetup, name string) {
	_, _ = runTool(cs.t, nil, cs.path, "close", name)
}

// activeTable returns the table of an active mapping with its key. The
// mappings are opened with --disable-keyring so that the table holds the
// key itself rather than a kernel keyring reference.
func activeTable(t *testing.T, name string) string {
	t.Helper()
	dmsetup := requireTool(t, "dmsetup")
	out, err := runTool(t, nil, dmsetup, "table", "--showkeys", name)
	if err != nil {
		t.Fatalf("dmsetup table: %v\n%s", err, out)
	}
	return strings.TrimSpace(out)
}

// TestGuestActivation: cryptsetup activates headers we wrote with the
// volume key we chose (dm table key, cipher, offset, sector size).
func TestGuestActivation(t *testing.T) {
	dev, f := guestDisk(t)
	cs := needCryptsetup(t)
	cases := []struct {
		name string
		o    Options
		size int
	}{
		// Parallel 1: the guest image lacks libgcc_s.so.1, and cryptsetup's
		// multi-threaded argon2 aborts without it (pthread_exit).
		{"luks2-512-argon2id", Options{PBKDF: PBKDF{Type: KDFArgon2id, Iterations: 4, MemoryKiB: 32768, Parallel: 1}}, 64},
		{"luks2-argon2i", Options{PBKDF: PBKDF{Type: KDFArgon2i, Iterations: 4, MemoryKiB: 32768, Parallel: 1}, HeaderSize: 2 << 20}, 64},
		{"luks2-4096-min", Options{PBKDF: testPBKDF2, SectorSize: 4096, HeaderSize: MinHeaderSize(2, 64, 0)}, 64},
		// CBC with plain64 IVs: the guest kernel has no essiv module, so
		// aes-cbc-essiv:sha256 is cross-checked on the host only.
		{"luks2-cbc-plain64", Options{PBKDF: testPBKDF2, Cipher: "aes-cbc-plain64", HeaderSize: 1 << 20}, 32},
		{"luks1", Options{Version: 1, PBKDF: testPBKDF2}, 64},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cs := cs.in(t)
			vk, _ := NewVolumeKey(tc.size)
			h, err := Create(tc.o, vk, []byte("guest pw"))
			if err != nil {
				t.Fatal(err)
			}
			if err := h.WriteHeader(f, FirstBlockFirst); err != nil {
				t.Fatal(err)
			}
			pw := writeTemp(t, "pw", []byte("guest pw"))
			name := "luksguest"
			defer closeMapping(cs, name)
			cs.ok(nil, "open", "--disable-keyring", "--key-file", pw, dev, name)
			table := activeTable(t, name)
			fields := strings.Fields(table)
			// 0 <len> crypt <cipher> <key> <iv_offset> <dev> <offset> [opts]
			if len(fields) < 8 || fields[2] != "crypt" {
				t.Fatalf("table %q", table)
			}
			if fields[3] != h.Cipher() {
				t.Errorf("cipher %s, want %s", fields[3], h.Cipher())
			}
			if fields[4] != hex.EncodeToString(vk.Bytes()) {
				t.Errorf("cryptsetup activated a different key")
			}
			if fields[7] != strconv.FormatInt(h.DataOffset()/512, 10) {
				t.Errorf("data offset %s sectors, want %d", fields[7], h.DataOffset()/512)
			}
			// LUKS2 sectors above 512 bytes: cryptsetup 2.6.1 loads
			// "1 sector_size:<n>" and NOT iv_large_sectors, i.e. IVs still
			// count 512-byte sectors (the dm table a conversion builds
			// must match this, or the data is unreadable after finalize).
			if ss := h.SectorSize(); ss != 512 {
				if !strings.HasSuffix(table, " 1 sector_size:"+strconv.Itoa(ss)) || strings.Contains(table, "iv_large_sectors") {
					t.Errorf("table options differ from \"1 sector_size:%d\": %q", ss, strings.Replace(table, fields[4], "<key>", 1))
				}
			} else if len(fields) != 8 {
				t.Errorf("512-byte sectors: unexpected table options: %q", strings.Replace(table, fields[4], "<key>", 1))
			}
			t.Logf("cryptsetup table: %s", strings.Replace(table, fields[4], "<key>", 1))
			cs.ok(nil, "close", name)
		})
	}
}

// TestGuestRequirementBlocksActivation: with the dmconvert requirement
// set, `cryptsetup open` refuses to activate; after clearing it, it
// activates.
func TestGuestRequirementBlocksActivation(t *testing.T) {
	dev, f := guestDisk(t)
	cs := needCryptsetup(t)
	vk, _ := NewVolumeKey(64)
	h, err := Create(Options{PBKDF: testPBKDF2, HeaderSize: 1 << 20}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SetRequirement(RequirementDmconvert); err != nil {
		t.Fatal(err)
	}
	if err := h.SetCheckpoint([]byte("in progress")); err != nil {
		t.Fatal(err)
	}
	if err := h.WriteHeader(f, FirstBlockFirst); err != nil {
		t.Fatal(err)
	}
	pw := writeTemp(t, "pw", []byte("pw"))
	name := "luksreq"
	defer closeMapping(cs, name)
	out := cs.fails(nil, "open", "--disable-keyring", "--key-file", pw, dev, name)
	if !strings.Contains(out, "Unmet LUKS2 requirements detected") {
		t.Errorf("open refused, but not for the requirement:\n%s", out)
	}
	if _, err := os.Stat("/dev/mapper/" + name); err == nil {
		t.Fatal("mapping exists although open failed")
	}
	if err := h.ClearRequirement(RequirementDmconvert); err != nil {
		t.Fatal(err)
	}
	h.RemoveCheckpoint()
	if err := h.WriteMetadata(f); err != nil {
		t.Fatal(err)
	}
	cs.ok(nil, "open", "--disable-keyring", "--key-file", pw, dev, name)
	if fields := strings.Fields(activeTable(t, name)); len(fields) < 5 || fields[4] != hex.EncodeToString(vk.Bytes()) {
		t.Fatal("activated with a different key")
	}
	cs.ok(nil, "close", name)
}

// TestGuestDisguisedLUKS1: cryptsetup does not open a disguised LUKS1
// header; after Reveal it does, with our key.
func TestGuestDisguisedLUKS1(t *testing.T) {
	dev, f := guestDisk(t)
	cs := needCryptsetup(t)
	vk, _ := NewVolumeKey(64)
	h, err := Create(Options{Version: 1, PBKDF: testPBKDF2}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SetDisguised(true); err != nil {
		t.Fatal(err)
	}
	if err := h.WriteHeader(f, FirstBlockFirst); err != nil {
		t.Fatal(err)
	}
	if err := h.SaveCheckpoint(f, []byte("phase 4")); err != nil {
		t.Fatal(err)
	}
	pw := writeTemp(t, "pw", []byte("pw"))
	name := "luksdisg"
	defer closeMapping(cs, name)
	cs.fails(nil, "open", "--disable-keyring", "--key-file", pw, dev, name)
	if blkid, err := runTool(t, nil, requireTool(t, "blkid"), "-p", dev); err == nil || strings.Contains(blkid, "LUKS") {
		t.Fatalf("blkid recognises the disguised header: %v %s", err, blkid)
	}
	back, err := Read(f)
	if err != nil || !back.Disguised() {
		t.Fatalf("read disguised: %v", err)
	}
	if cp, err := back.Checkpoint(); err != nil || string(cp) != "phase 4" {
		t.Fatalf("checkpoint %q %v", cp, err)
	}
	if err := back.Reveal(f); err != nil {
		t.Fatal(err)
	}
	cs.ok(nil, "open", "--disable-keyring", "--key-file", pw, dev, name)
	if fields := strings.Fields(activeTable(t, name)); len(fields) < 5 || fields[4] != hex.EncodeToString(vk.Bytes()) {
		t.Fatal("activated with a different key")
	}
	cs.ok(nil, "close", name)
}

// TestGuestPlainHash: the key stock cryptsetup makes from a passphrase in
// plain mode (open --type plain, the passphrase on standard input, read up
// to its newline) is PlainKey's, for each hash and key size here and for
// cryptsetup's default hash.
func TestGuestPlainHash(t *testing.T) {
	dev, _ := guestDisk(t)
	cs := needCryptsetup(t)
	for _, c := range []struct {
		hash string // "" : cryptsetup's default, DefaultPlainHash
		bits int
	}{
		{"", 256}, {"ripemd160", 512}, {"sha1", 256}, {"sha256", 512}, {"sha512", 512}, {"sha256:16", 256}, {"plain", 256},
	} {
		t.Run(c.hash+"-"+strconv.Itoa(c.bits), func(t *testing.T) {
			cs := cs.in(t)
			name := "plainhash"
			pass := "plain passphrase, 32 bytes long."
			args := []string{"open", "--type", "plain", "--cipher", "aes-xts-plain64", "--key-size", strconv.Itoa(c.bits)}
			spec := DefaultPlainHash
			if c.hash != "" {
				spec = c.hash
				args = append(args, "--hash", c.hash)
			}
			defer closeMapping(cs, name)
			cs.ok([]byte(pass+"\nnot part of it\n"), append(args, dev, name)...)
			fields := strings.Fields(activeTable(t, name))
			if len(fields) < 5 {
				t.Fatalf("table %q", fields)
			}
			want, err := PlainKey(spec, []byte(pass), c.bits/8)
			if err != nil {
				t.Fatal(err)
			}
			if fields[4] != hex.EncodeToString(want) {
				t.Errorf("cryptsetup made another key than PlainKey(%s, %d bits)", spec, c.bits)
			}
			cs.ok(nil, "close", name)
		})
	}
}

// TestGuestSerpentTwofish: Serpent and Twofish LUKS volumes, both ways.
// cryptsetup (its backend runs them through the kernel's AF_ALG here)
// encrypts the keyslots of such a volume with the data's cipher, LUKS2
// too; we open them to the volume key cryptsetup dumps. LUKS1 headers we
// make (their keyslots in the data's cipher, our Serpent and Twofish)
// open in cryptsetup to our key, and it activates them.
func TestGuestSerpentTwofish(t *testing.T) {
	testvm.RequireGuest(t)
	cs := needCryptsetup(t)
	pass := []byte("serpent and twofish")
	for _, c := range []struct {
		luks   int
		cipher string
		bits   int
	}{
		{1, "serpent-xts-plain64", 512},
		{2, "serpent-xts-plain64", 512},
		{1, "twofish-cbc-essiv:sha256", 256},
		{2, "twofish-xts-plain64", 256},
		{1, "serpent-cbc-plain64", 128},
	} {
		t.Run(strconv.Itoa(c.luks)+"-"+c.cipher, func(t *testing.T) {
			cs := cs.in(t)
			pw := writeTemp(t, "pw", pass)
			dev := deviceFile(t, nil, 8<<20)
			cs.ok(nil, "luksFormat", "--batch-mode", "--type", "luks"+strconv.Itoa(c.luks), "--cipher", c.cipher, "--key-size", strconv.Itoa(c.bits),
				"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pw, dev)
			want := cs.dumpVolumeKey(dev, pw)
			h := readHeader(t, dev)
			ks := h.Keyslots()
			if len(ks) != 1 || ks[0].Cipher != c.cipher {
				t.Fatalf("cryptsetup's keyslots %+v: want one encrypted with %s", ks, c.cipher)
			}
			vk, _, err := h.Unlock(pass)
			if err != nil || hex.EncodeToString(vk.Bytes()) != hex.EncodeToString(want) {
				t.Fatalf("our unlock of cryptsetup's %s keyslot: %v (key matches: %v)", c.cipher, err, err == nil && hex.EncodeToString(vk.Bytes()) == hex.EncodeToString(want))
			}
			if c.luks != 1 {
				return
			}
			// Ours, LUKS1: the keyslot in the data's cipher.
			key := randBytes(t, c.bits/8)
			nvk := NewVolumeKeyFromBytes(key)
			defer nvk.Wipe()
			oh, err := Create(Options{Version: 1, Cipher: c.cipher, PBKDF: PBKDF{Type: KDFPBKDF2, Iterations: 1000}}, nvk, pass)
			if err != nil {
				t.Fatal(err)
			}
			img, err := oh.Image()
			if err != nil {
				t.Fatal(err)
			}
			ours := deviceFile(t, img, 8<<20)
			if got := cs.dumpVolumeKey(ours, pw); hex.EncodeToString(got) != hex.EncodeToString(key) {
				t.Fatalf("cryptsetup opens our %s LUKS1 header to another key", c.cipher)
			}
			name := "sptf" + strconv.Itoa(c.bits)
			cs.ok(nil, "open", "--disable-keyring", "--key-file", pw, ours, name)
			defer closeMapping(cs, name)
			if tb := activeTable(t, name); !strings.Contains(tb, " crypt "+c.cipher+" "+hex.EncodeToString(key)+" ") {
				t.Fatalf("cryptsetup's table of our %s header: %s", c.cipher, tb)
			}
		})
	}
}
