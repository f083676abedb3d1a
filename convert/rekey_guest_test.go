package convert

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

// Real-kernel tests of `dmconvert rekey`: a LUKS2 volume made by stock
// cryptsetup, in use (LVM with a mounted ext4 and a raw LV, or an ext4
// mounted on the mapping itself), under a writer; interrupted (SIGINT,
// kill -9) and resumed, or aborted; then every file and acknowledged
// record is checked, stock cryptsetup opens the volume with the
// passphrase, and the old volume key no longer opens it.

// Two VMs share the rekey guest tests, for the suite's time (one VM ran
// them in ~15 minutes, the longest of make test): TestVMRekey the LUKS
// sources, TestVMRekeyPlain the plain and TrueCrypt ones.
const (
	rekeyLUKSRun  = "^TestGuestRekey(LVM|FS|Abort|Cipher|SerpentLUKS2|LUKS1.*|ReadOnly)$"
	rekeyPlainRun = "^TestGuestRekey(Plain|TCrypt)"
)

// vmRekey (TestVMRekey, TestVMRekeyPlain) boots one VM for the rekey
// guest tests that run matches. Both VMs get the same disks, so every
// test finds its disk at the same index.
func vmRekey(t *testing.T, run string) {
	vmParallel(t)
	bin := testvm.BuildStatic(t, "./cmd/dmconvert")
	testvm.RunTestsInGuest(t, testvm.Options{
		// d[3] holds the journals of every test (each has a 16 MiB header image)
		// d[7], d[8], d[9]: the plain dm-crypt tests (rekey_plain_guest_test.go)
		Disks: []testvm.Disk{{Size: 128 * guestMiB}, {Size: 96 * guestMiB}, {Size: 128 * guestMiB}, {Size: 256 * guestMiB}, {Size: 128 * guestMiB}, {Size: 64 * guestMiB}, {Size: 32 * guestMiB},
			{Size: 48 * guestMiB}, {Size: 64 * guestMiB}, {Size: 40 * guestMiB},
			// d[10], d[11], d[12]: the TrueCrypt tests (rekey_tcrypt_guest_test.go)
			{Size: 24 * guestMiB}, {Size: 28 * guestMiB}, {Size: 16 * guestMiB},
			// d[13]: plain to LUKS2 with the header on the disk; d[14]: VeraCrypt with a PIM
			{Size: 24 * guestMiB}, {Size: 16 * guestMiB},
			// d[6]: LUKS1 with the default 512-bit key (in place); d[15]: LUKS1 with a file system on the mapping
			{Size: 24 * guestMiB},
			// d[16]: a Serpent LUKS2 volume made by cryptsetup
			{Size: 24 * guestMiB},
			// d[17]: a plain mapping whose key is in the kernel keyring
			{Size: 24 * guestMiB},
			// d[18]: a TrueCrypt cipher cascade (refused)
			{Size: 16 * guestMiB},
			// d[19], d[20]: a read-only mapping; a PV with a read-only LV
			{Size: 32 * guestMiB}, {Size: 64 * guestMiB}},
		Run:   run,
		Files: map[string]string{"dmconvert": bin},
		// Each VM: 8 or 9 tests, ~5 min of QEMU CPU; under make test it
		// shares the two cores with three others (one VM for all 17
		// timed out at 20 minutes with 2 tests left, at 717 s of CPU in
		// 1185 s).
		Timeout: 30 * time.Minute,
	})
}

// saveVolumeKey writes the volume key of the LUKS device dev (opened by
// the passphrase file) to path, with cryptsetup.
func saveVolumeKey(t testing.TB, dev, path string) []byte {
	t.Helper()
	os.Remove(path) // cryptsetup does not overwrite a key file
	sh(t, "cryptsetup", "luksDump", "-q", "--dump-volume-key", "--volume-key-file", path, "--key-file", pwFile, dev)
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		t.Fatalf("cryptsetup saved no volume key of %s: %v", dev, err)
	}
	return b
}

// checkRekeyed: the old volume key no longer opens dev, the passphrase
// opens it to a different key, and the header's data offset moved.
func checkRekeyed(t testing.TB, dev string, oldKey []byte, oldKeyFile string) {
	t.Helper()
	if out, err := shOK("cryptsetup", "open", "--test-passphrase", "--volume-key-file", oldKeyFile, dev); err == nil {
		t.Fatalf("the old volume key still opens %s:\n%s", dev, out)
	}
	if out, err := shOK("cryptsetup", "open", "--volume-key-file", oldKeyFile, dev, "rekey-oldkey"); err == nil {
		shOK("cryptsetup", "close", "rekey-oldkey")
		t.Fatalf("cryptsetup opened %s with the old volume key:\n%s", dev, out)
	}
	nk := saveVolumeKey(t, dev, "/tmp/rekey-new.key")
	if bytes.Equal(nk, oldKey) {
		t.Fatalf("%s still has its old volume key", dev)
	}
	dump := sh(t, "cryptsetup", "luksDump", dev)
	if strings.Contains(dump, "dmconvert") {
		t.Fatalf("the header of %s still carries dmconvert's marks:\n%s", dev, dump)
	}
	t.Logf("%s: new volume key; segment: %s", dev, segmentLine(dump))
}

func segmentLine(dump string) string {
	i := strings.Index(dump, "Data segments:")
	if i < 0 {
		// LUKS1: the data offset is the payload offset (sectors).
		if m := regexp.MustCompile(`(?m)^Payload offset:\s+\d+$`).FindString(dump); m != "" {
			return m
		}
		return "?"
	}
	for _, l := range strings.Split(dump[i:], "\n") {
		if s := strings.TrimSpace(l); strings.HasPrefix(s, "offset:") {
			return s
		}
	}
	return "?"
}

// TestGuestRekeyLVM: an installer-style LUKS2+LVM disk with a second
// passphrase; rekey is refused until --remove-other-keyslots, then runs
// under a writer, is stopped with SIGINT, resumed, and checked live and
// cold.
func TestGuestRekeyLVM(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st, name := luksStack(t, "rkl", d[0], state)
	os.WriteFile("/tmp/other-pw", []byte("another passphrase"), 0o600)
	sh(t, "cryptsetup", "luksAddKey", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--key-file", pwFile, st.Disk, "/tmp/other-pw")
	oldKey := saveVolumeKey(t, st.Disk, "/tmp/rkl-old.key")
	j := st.file(state, "journal")
	// Quiet the disk (ext4 initialises its tables in the background) to
	// check that a refused or dry run writes nothing.
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	refused(t, st.Disk, 2, "keyslots", "rekey", name, "--batch-mode", "--key-file", pwFile, "--journal", j)
	// A dry run prints the plan and writes nothing.
	before := diskBytes(t, st.Disk)
	code, out := cliRun(t, "rekey", name, "--dry-run", "--remove-other-keyslots", "--key-file", pwFile, "--journal", j)
	requireExit(t, "rekey --dry-run", code, 0, out)
	if !bytes.Equal(before, diskBytes(t, st.Disk)) || !strings.Contains(out, "Dry run") {
		t.Fatalf("rekey --dry-run changed the disk or printed no plan:\n%s", out)
	}
	if _, err := os.Stat(j); err == nil {
		t.Fatal("rekey --dry-run created the journal")
	}
	for i, mp := range st.Mounts {
		sh(t, "mount", "/dev/mapper/"+st.VG+"-"+st.FSLVs[i], mp)
	}
	w := startWriter(t, st, state)
	r := cliStart(t, "rekey", name, "--remove-other-keyslots", "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "1M")
	r.waitProgress(t, 0.4)
	r.cmd.Process.Signal(syscall.SIGINT)
	code, errOut := r.wait()
	requireExit(t, "rekey after SIGINT", code, 5, errOut)
	if out, err := shOK("cryptsetup", "open", "--key-file", pwFile, st.Disk, "rkl-second"); err == nil {
		shOK("cryptsetup", "close", "rkl-second")
		t.Fatalf("stock cryptsetup opened the half-rekeyed disk:\n%s", out)
	}
	code, out = cliRun(t, "status", "--journal", j)
	requireExit(t, "status of the interrupted rekey", code, 0, out)
	code, out = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the rekey", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	verifyEncryptedCold(t, st, state, name)
	checkRekeyed(t, st.Disk, oldKey, "/tmp/rkl-old.key")
	if out, err := shOK("cryptsetup", "open", "--test-passphrase", "--key-file", "/tmp/other-pw", st.Disk); err == nil {
		t.Fatalf("the removed keyslot's passphrase still opens %s:\n%s", st.Disk, out)
	}
}

// rekeyStopped runs a rekey of the LUKS mapping name (journal j, chunks
// of the given size) and stops it with SIGTERM once frac of it is done:
// exit 5.
func rekeyStopped(t testing.TB, name, j string, frac float64, chunk string) {
	t.Helper()
	r := cliStart(t, "rekey", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", chunk)
	r.waitProgress(t, frac)
	r.cmd.Process.Signal(syscall.SIGTERM)
	code, errOut := r.wait()
	requireExit(t, "rekey after SIGTERM", code, 5, errOut)
}

// fsOnMapping makes a LUKS2 device with an ext4 mounted on the mapping
// itself; the raw writer writes into a preallocated file on it.
func fsOnMapping(t testing.TB, tag, disk, state string, openArgs ...string) (*stack, string) {
	t.Helper()
	// verifyStack finds a file system at /dev/mapper/<VG>-<LV>: the
	// mapping's name has that shape.
	name := tag + "-crypt"
	sh(t, "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--key-file", pwFile, disk)
	sh(t, "cryptsetup", append(append([]string{"open", "--key-file", pwFile}, openArgs...), disk, name)...)
	return fsStack(t, tag, disk, state, name), name
}

// fsStack puts an ext4 on the open mapping name (of disk), mounts it at
// /mnt/<tag> with the raw writer's preallocated file on it, and writes the
// manifest. mkfs takes mkfsOpts too.
func fsStack(t testing.TB, tag, disk, state, name string, mkfsOpts ...string) *stack {
	t.Helper()
	dev := "/dev/mapper/" + name
	sh(t, "mkfs.ext4", append([]string{"-q", "-F"}, append(mkfsOpts, dev)...)...)
	mp := "/mnt/" + tag
	os.MkdirAll(mp, 0o755)
	sh(t, "mount", dev, mp)
	raw := filepath.Join(mp, "rawslots")
	if err := os.WriteFile(raw, make([]byte, rawSlots*recSize), 0o644); err != nil {
		t.Fatal(err)
	}
	st := &stack{Tag: tag, Disk: disk, VG: tag, RawLV: raw, Mounts: []string{mp}, FSLVs: []string{"crypt"}, FSTypes: []string{"ext4"},
		Sizes: []uint64{blockDevBytes(t, dev)}}
	writeManifest(t, st, state)
	return st
}

// TestGuestRekeyFS: an ext4 mounted directly on the LUKS2 mapping, with
// a second keyslot opened by a key file, is rekeyed under a writer
// keeping both (--also-key-file; a repeated or wrong one is refused
// first), the process killed with SIGKILL mid-run, then resumed with the
// key file alone; checked live and after a cold open with the
// passphrase, and the key file opens the new key too.
func TestGuestRekeyFS(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	// Opened with --allow-discards (crypttab's "discard"): the rekeyed
	// mapping keeps the flag.
	st, name := fsOnMapping(t, "rkfs", d[1], state, "--allow-discards")
	// A second keyslot, opened by a key file, kept with --also-key-file.
	kf := "/tmp/rkfs-second.key"
	os.WriteFile(kf, []byte("the second key file\n\x00binary"), 0o600)
	sh(t, "cryptsetup", "luksAddKey", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--key-file", pwFile, st.Disk, kf)
	// The key file's keyslot 1 is preferred and bound to a token (as a
	// TPM2 or FIDO2 enrollment is): after the rekey the key file opens
	// keyslot 1 still, preferred, and the token is bound to it.
	sh(t, "cryptsetup", "config", "--priority", "prefer", "--key-slot", "1", st.Disk)
	os.WriteFile("/tmp/rkfs-token.json", []byte(`{"type":"enrollment","keyslots":["1"],"note":"kept"}`), 0o600)
	sh(t, "cryptsetup", "token", "import", "--token-id", "3", "--json-file", "/tmp/rkfs-token.json", st.Disk)
	oldKey := saveVolumeKey(t, st.Disk, "/tmp/rkfs-old.key")
	j := st.file(state, "journal")
	sh(t, "umount", st.Mounts[0]) // a quiet disk, to check that a refusal writes nothing
	refused(t, st.Disk, 2, "keyslot 0", "rekey", name, "--batch-mode", "--key-file", pwFile, "--also-key-file", pwFile, "--journal", j)
	os.WriteFile("/tmp/rkfs-wrong.key", []byte("not a passphrase of it"), 0o600)
	refused(t, st.Disk, 3, "opens no keyslot", "rekey", name, "--batch-mode", "--key-file", pwFile, "--also-key-file", "/tmp/rkfs-wrong.key", "--journal", j)
	sh(t, "mount", "/dev/mapper/"+name, st.Mounts[0])
	w := startWriter(t, st, state)
	r := cliStart(t, "rekey", "/dev/mapper/"+name, "--batch-mode", "--json", "--key-file", pwFile, "--also-key-file", kf, "--journal", j, "--chunk-size", "2M")
	r.waitProgress(t, 0.3)
	r.cmd.Process.Kill()
	code, _ := r.wait()
	requireExit(t, "rekey after kill -9", code, 128+int(syscall.SIGKILL), "")
	// Either passphrase resumes: this one was not the main one.
	code, out := cliRun(t, "resume", "--journal", j, "--key-file", kf)
	requireExit(t, "resume of the rekey with the second key file", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	if tb := sh(t, "dmsetup", "table", name); !strings.Contains(tb, "allow_discards") {
		t.Fatalf("the rekeyed mapping lost allow_discards: %s", tb)
	}
	// The data area now starts 2 MiB earlier and ends where it did: the
	// mapping is 2 MiB larger (as cryptsetup open maps it); the file
	// system is the same.
	if got := blockDevBytes(t, "/dev/mapper/"+name); got != st.Sizes[0]+2<<20 {
		t.Fatalf("the rekeyed mapping is %d bytes, want %d", got, st.Sizes[0]+2<<20)
	}
	st.Sizes[0] += 2 << 20
	verifyStack(t, st, state)
	// Cold: close, open with stock cryptsetup and the passphrase.
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, name)
	verifyStack(t, st, state)
	checkRekeyed(t, st.Disk, oldKey, "/tmp/rkfs-old.key")
	// The key file kept opens the new key too, in a keyslot of its own.
	os.Remove("/tmp/rkfs-kf.vk")
	sh(t, "cryptsetup", "luksDump", "-q", "--dump-volume-key", "--volume-key-file", "/tmp/rkfs-kf.vk", "--key-file", kf, st.Disk)
	byKF, _ := os.ReadFile("/tmp/rkfs-kf.vk")
	if byPW, _ := os.ReadFile("/tmp/rekey-new.key"); len(byKF) == 0 || !bytes.Equal(byKF, byPW) {
		t.Fatal("the key file given with --also-key-file does not open the new volume key")
	}
	if n := len(regexp.MustCompile(`(?m)^\s+\d+: luks2$`).FindAllString(sh(t, "cryptsetup", "luksDump", st.Disk), -1)); n != 2 {
		t.Fatalf("%d keyslots after the rekey, want 2 (the passphrase and the key file)", n)
	}
	// Each in its old keyslot, with its priority and token.
	sh(t, "cryptsetup", "open", "--test-passphrase", "--key-slot", "0", "--key-file", pwFile, st.Disk)
	sh(t, "cryptsetup", "open", "--test-passphrase", "--key-slot", "1", "--key-file", kf, st.Disk)
	if tok := sh(t, "cryptsetup", "token", "export", "--token-id", "3", st.Disk); !strings.Contains(tok, `"keyslots":["1"]`) || !strings.Contains(tok, `"note":"kept"`) {
		t.Fatalf("the token bound to keyslot 1 after the rekey: %s", tok)
	}
	if dump := sh(t, "cryptsetup", "luksDump", st.Disk); !regexp.MustCompile(`(?s)\n\s+1: luks2.*?Priority:\s+preferred`).MatchString(dump) {
		t.Fatalf("keyslot 1 is no longer preferred:\n%s", dump)
	}
}

// TestGuestRekeyAbort: a rekey stopped half way with SIGTERM and aborted
// walks back online to the old key: every write is there and the old
// volume key opens the disk. While it is stopped, a decrypt of the
// mapping or its disk is refused as the run's.
func TestGuestRekeyAbort(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st, name := luksStack(t, "rka", d[2], state)
	oldKey := saveVolumeKey(t, st.Disk, "/tmp/rka-old.key")
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	rekeyStopped(t, name, j, 0.5, "1M")
	// Stopped, the mapping restacked onto the run's helpers: a decrypt
	// of the mapping or of its disk is refused as the run's.
	for _, target := range []string{name, st.Disk} {
		code, out := cliRun(t, "decrypt", target, "--key-file", pwFile, "--batch-mode", "--journal", st.file(state, "other.journal"))
		if code != 2 || !strings.Contains(out, target+": a dmconvert run") || !strings.Contains(out, "resume or abort that run") {
			t.Fatalf("decrypt of %s mid-rekey: exit %d, want 2 and the run named:\n%s", target, code, out)
		}
		t.Logf("refused as expected: %s", strings.TrimSpace(out))
	}
	code, out := cliRun(t, "abort", "--journal", j, "--key-file", pwFile)
	requireExit(t, "abort of the rekey", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	verifyEncryptedCold(t, st, state, name)
	if k := saveVolumeKey(t, st.Disk, "/tmp/rka-after.key"); !bytes.Equal(k, oldKey) {
		t.Fatal("the aborted rekey changed the volume key")
	}
	sh(t, "cryptsetup", "open", "--test-passphrase", "--volume-key-file", "/tmp/rka-old.key", st.Disk)
	if dump := sh(t, "cryptsetup", "luksDump", st.Disk); strings.Contains(dump, "dmconvert") || strings.Contains(dump, "unbound") {
		t.Fatalf("the aborted rekey left marks or the staged keyslot:\n%s", dump)
	}
}

// dumpSays checks that `cryptsetup luksDump dev` names cipher in the data
// segment and that its first keyslot holds a keyBits key.
func dumpSays(t testing.TB, dev, cipher string, keyBits int) string {
	t.Helper()
	dump := sh(t, "cryptsetup", "luksDump", dev)
	seg := regexp.MustCompile(`(?m)^Data segments:\n(?:[ \t]+.*\n)*?[ \t]+cipher:[ \t]+(\S+)\n`).FindStringSubmatch(dump)
	if seg == nil || seg[1] != cipher {
		t.Fatalf("luksDump of %s: the data segment's cipher is %v, want %s:\n%s", dev, seg, cipher, dump)
	}
	if !regexp.MustCompile(`(?m)^Keyslots:\n[ \t]+\d+: luks2\n[ \t]+Key:[ \t]+` + strconv.Itoa(keyBits) + ` bits\n`).MatchString(dump) {
		t.Fatalf("luksDump of %s: the first keyslot does not hold a %d-bit key:\n%s", dev, keyBits, dump)
	}
	return dump
}

// helperCiphers returns the ciphers of a run's crypt helpers in the live
// tables (`dmsetup table` shows no keys): by suffix, "old" and "new".
func helperCiphers(t testing.TB) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, l := range strings.Split(sh(t, "dmsetup", "table"), "\n") {
		name, table, ok := strings.Cut(l, ": ")
		f := strings.Fields(table)
		if !ok || !strings.HasPrefix(name, "dmconvert-") || len(f) < 4 || f[2] != "crypt" {
			continue
		}
		out[name[strings.LastIndexByte(name, '-')+1:]] = f[3]
	}
	return out
}

// TestGuestRekeyCipher: a mounted LUKS2 volume with LVM on it, made by
// stock cryptsetup (aes-xts-plain64, 512-bit key), is rekeyed online to
// serpent-xts-plain64 with a 256-bit key under a writer. Bad ciphers are
// refused first (by dmconvert's own checks and by the kernel) with the
// disk untouched; a dry run shows the change; a first run is stopped by
// SIGTERM and aborted (the old cipher and key come back); a second run is
// killed with SIGKILL (the helpers hold the old and the new cipher) and
// resumed. Then every file and acknowledged record is there, luksDump
// names the new cipher and key size, stock cryptsetup opens the volume
// with the passphrase (to a serpent mapping), and the old volume key no
// longer opens it.
func TestGuestRekeyCipher(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st, name := luksStack(t, "rkc", d[4], state)
	dumpSays(t, st.Disk, "aes-xts-plain64", 512)
	oldKey := saveVolumeKey(t, st.Disk, "/tmp/rkc-old.key")
	const newCipher, newBits = "serpent-xts-plain64", "256"
	j := st.file(state, "journal")

	// Refusals, with the disk quiet: dmconvert's own checks (before the
	// passphrase is read), then the kernel's (nothing left behind).
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	for _, c := range []struct{ cipher, bits, why string }{
		{newCipher, "264", "XTS splits the key into two halves"},
		{"aes-xts-plain64", "384", "takes a 256- or 512-bit key"},
		{"serpent-xts", newBits, "has no IV mode"},
	} {
		code, out := cliRun(t, "rekey", name, "--batch-mode", "--key-file", pwFile, "--journal", j, "--cipher", c.cipher, "--key-size", c.bits)
		if code != 2 || !strings.Contains(out, name) || !strings.Contains(out, c.why) {
			t.Fatalf("rekey --cipher %s --key-size %s: exit %d, want 2 naming %s and saying %q:\n%s", c.cipher, c.bits, code, name, c.why, out)
		}
	}
	for _, c := range []struct{ cipher, why string }{
		{"nosuchcipher-xts-plain64", `the kernel has no cipher "nosuchcipher"`},
		{"serpent-xts-nosuchiv", `refuses IV mode "nosuchiv"`},
	} {
		refused(t, st.Disk, 2, c.why, "rekey", name, "--batch-mode", "--key-file", pwFile, "--journal", j, "--cipher", c.cipher, "--key-size", newBits)
	}
	if left := helperCiphers(t); len(left) != 0 {
		t.Fatalf("refused rekeys left devices: %v", left)
	}
	if _, err := os.Stat(j); err == nil {
		t.Fatal("a refused rekey created the journal")
	}
	// A dry run shows the change, in text and in the JSON plan.
	code, out := cliRun(t, "rekey", name, "--dry-run", "--key-file", pwFile, "--journal", j, "-c", newCipher, "-s", newBits)
	requireExit(t, "rekey --dry-run", code, 0, out)
	if !strings.Contains(out, "aes-xts-plain64 with a 512-bit key, 512-byte sectors; changes to serpent-xts-plain64 with a 256-bit key") {
		t.Fatalf("the dry run does not show the cipher change:\n%s", out)
	}
	code, out = cliRun(t, "rekey", name, "--dry-run", "--json", "--key-file", pwFile, "--journal", j, "-c", newCipher, "-s", newBits)
	requireExit(t, "rekey --dry-run --json", code, 0, out)
	if !strings.Contains(out, `"crypt":{"cipher":"serpent-xts-plain64","key_bytes":32,"sector_size":512}`) ||
		!strings.Contains(out, `"old_crypt":{"cipher":"aes-xts-plain64","key_bytes":64,"sector_size":512}`) {
		t.Fatalf("the JSON plan does not carry both ciphers:\n%s", out)
	}
	for i, mp := range st.Mounts {
		sh(t, "mount", "/dev/mapper/"+st.VG+"-"+st.FSLVs[i], mp)
	}

	w := startWriter(t, st, state)
	rekey := func(journal string) *running {
		return cliStart(t, "rekey", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", journal,
			"--chunk-size", "1M", "--cipher", newCipher, "--key-size", newBits)
	}
	// First run: SIGTERM, then abort back to the old cipher and key.
	r := rekey(j)
	r.waitProgress(t, 0.3)
	r.cmd.Process.Signal(syscall.SIGTERM)
	code, errOut := r.wait()
	requireExit(t, "rekey after SIGTERM", code, 5, errOut)
	if hc := helperCiphers(t); hc["old"] != "aes-xts-plain64" || hc["new"] != newCipher {
		t.Fatalf("the interrupted rekey's helpers: %v, want old aes-xts-plain64 and new %s", hc, newCipher)
	}
	code, out = cliRun(t, "abort", "--journal", j, "--key-file", pwFile)
	requireExit(t, "abort of the rekey", code, 0, out)
	dumpSays(t, st.Disk, "aes-xts-plain64", 512)
	if k := saveVolumeKey(t, st.Disk, "/tmp/rkc-after-abort.key"); !bytes.Equal(k, oldKey) {
		t.Fatal("the aborted rekey changed the volume key")
	}
	if tb := sh(t, "dmsetup", "table", name); !strings.Contains(tb, " crypt aes-xts-plain64 ") {
		t.Fatalf("%s after the abort: %s", name, tb)
	}

	// Second run, in place (the data offset stays; each chunk's old
	// ciphertext goes to the journal first): kill -9 mid-run, the
	// helpers keep both ciphers; resume.
	j2 := st.file(state, "journal2")
	code, out = cliRun(t, "rekey", name, "--dry-run", "--in-place", "--key-file", pwFile, "--journal", j2, "--chunk-size", "1M", "-c", newCipher, "-s", newBits)
	requireExit(t, "rekey --in-place --dry-run", code, 0, out)
	if !strings.Contains(out, "re-encrypted with a new random key where it is (data offset 16.0 MiB), 1.0 MiB at a time") {
		t.Fatalf("the dry run does not plan an in-place rekey:\n%s", out)
	}
	r = cliStart(t, "rekey", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j2,
		"--chunk-size", "1M", "--cipher", newCipher, "--key-size", newBits, "--in-place")
	r.waitProgress(t, 0.4)
	r.cmd.Process.Kill()
	code, _ = r.wait()
	requireExit(t, "rekey after kill -9", code, 128+int(syscall.SIGKILL), "")
	if hc := helperCiphers(t); hc["old"] != "aes-xts-plain64" || hc["new"] != newCipher {
		t.Fatalf("the killed rekey's helpers: %v, want old aes-xts-plain64 and new %s", hc, newCipher)
	}
	if out, err := shOK("cryptsetup", "open", "--key-file", pwFile, st.Disk, "rkc-second"); err == nil {
		shOK("cryptsetup", "close", "rkc-second")
		t.Fatalf("stock cryptsetup opened the half-rekeyed disk:\n%s", out)
	}
	code, out = cliRun(t, "resume", "--journal", j2, "--key-file", pwFile)
	requireExit(t, "resume of the rekey", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	if tb := sh(t, "dmsetup", "table", name); !strings.Contains(tb, " crypt "+newCipher+" ") {
		t.Fatalf("%s after the rekey: %s", name, tb)
	}
	verifyStack(t, st, state)
	// Cold: stock cryptsetup opens it with the passphrase, as serpent.
	verifyEncryptedCold(t, st, state, name)
	if status := sh(t, "cryptsetup", "status", name); !regexp.MustCompile(`cipher:\s+`+newCipher+`\n`).MatchString(status) ||
		!regexp.MustCompile(`keysize:\s+`+newBits+` bits`).MatchString(status) {
		t.Fatalf("cryptsetup status after a cold open:\n%s", status)
	}
	dump := dumpSays(t, st.Disk, newCipher, 256)
	if seg := segmentLine(dump); seg != "offset: 16777216 [bytes]" {
		t.Fatalf("the in-place rekey moved the data: %s", seg)
	}
	checkRekeyed(t, st.Disk, oldKey, "/tmp/rkc-old.key")
	if k := saveVolumeKey(t, st.Disk, "/tmp/rkc-new.key"); len(k) != 32 {
		t.Fatalf("the new volume key has %d bytes, want 32", len(k))
	}
	t.Logf("the rekeyed header: %s", segmentLine(dump))
}

// TestGuestRekeySerpentLUKS2: a LUKS2 volume cryptsetup made with
// serpent-xts-plain64 (its keyslot encrypted with Serpent too: the
// kernel runs it for cryptsetup) and an ext4 mounted on the mapping is
// rekeyed under a writer; checked live, after a cold open by stock
// cryptsetup (still Serpent), and the old volume key opens nothing.
func TestGuestRekeySerpentLUKS2(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	disk := d[16]
	tag := "rksp"
	name := tag + "-crypt"
	sh(t, "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--cipher", "serpent-xts-plain64", "--key-size", "512",
		"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pwFile, disk)
	if dump := sh(t, "cryptsetup", "luksDump", disk); !regexp.MustCompile(`(?m)^Keyslots:\n(?:.*\n)*?[ \t]+Cipher:[ \t]+serpent-xts-plain64\n`).MatchString(dump) {
		t.Fatalf("cryptsetup's keyslot is not Serpent-encrypted:\n%s", dump)
	}
	oldKey := saveVolumeKey(t, disk, "/tmp/rksp-old.key")
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	st := fsStack(t, tag, disk, state, name, "-E", "lazy_itable_init=0,lazy_journal_init=0")
	w := startWriter(t, st, state)
	code, out := cliRun(t, "rekey", name, "--batch-mode", "--key-file", pwFile, "--journal", st.file(state, "journal"), "--chunk-size", "1M")
	requireExit(t, "rekey of the Serpent volume", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	st.Sizes[0] += 1 << 20 // the data starts 1 MiB earlier and ends where it did
	verifyStack(t, st, state)
	sh(t, "umount", st.Mounts[0])
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	sh(t, "mount", "/dev/mapper/"+name, st.Mounts[0])
	verifyStack(t, st, state)
	dumpSays(t, disk, "serpent-xts-plain64", 512)
	checkRekeyed(t, disk, oldKey, "/tmp/rksp-old.key")
}
