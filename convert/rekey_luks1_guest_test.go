package convert

import (
	"bytes"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

// notLUKS checks that nothing at boot would open dev: stock cryptsetup
// and blkid do not recognise it (a LUKS1 rekey in progress disguises the
// header's magic) and `cryptsetup open` fails.
func notLUKS(t testing.TB, dev string) {
	t.Helper()
	if out, err := shOK("cryptsetup", "isLuks", dev); err == nil {
		t.Fatalf("cryptsetup recognises the half-rekeyed %s as LUKS:\n%s", dev, out)
	}
	if typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", dev); strings.TrimSpace(typ) == "crypto_LUKS" {
		t.Fatalf("blkid -p says the half-rekeyed %s is crypto_LUKS", dev)
	}
	if out, err := shOK("cryptsetup", "open", "--key-file", pwFile, dev, "rk1-second"); err == nil {
		shOK("cryptsetup", "close", "rk1-second")
		t.Fatalf("stock cryptsetup opened the half-rekeyed %s:\n%s", dev, out)
	}
}

// luks1Dump checks `cryptsetup luksDump dev`: LUKS1, the data at payload
// sectors, and the enabled keyslots (e.g. "0 1").
func luks1Dump(t testing.TB, dev string, payload int, slots string) string {
	t.Helper()
	dump := sh(t, "cryptsetup", "luksDump", dev)
	var enabled []string
	for _, m := range regexp.MustCompile(`(?m)^Key Slot (\d): ENABLED$`).FindAllStringSubmatch(dump, -1) {
		enabled = append(enabled, m[1])
	}
	if !regexp.MustCompile(`(?m)^Version:\s+1$`).MatchString(dump) ||
		!regexp.MustCompile(`(?m)^Payload offset:\s+`+strconv.Itoa(payload)+`$`).MatchString(dump) ||
		strings.Join(enabled, " ") != slots {
		t.Fatalf("luksDump of %s: want LUKS1, payload offset %d, keyslots %q enabled (have %q):\n%s", dev, payload, slots, strings.Join(enabled, " "), dump)
	}
	return dump
}

// TestGuestRekeyLUKS1: a LUKS1 volume made by stock cryptsetup
// (luksFormat --type luks1 with a 256-bit aes-xts-plain64 key: its
// keyslot material leaves 1016 KiB before the data at 2 MiB) with LVM on
// it, a mounted ext4 and a second passphrase, is rekeyed online under a
// writer. First the refusals (a cipher change, the keyslot of the other
// passphrase) with the disk untouched, and a dry run; then a run stopped
// with SIGTERM and aborted (the old key and both passphrases are back);
// then a run killed with SIGKILL mid-run (stock cryptsetup and blkid do
// not recognise the disk) and resumed by naming the disk only (the
// disguised header leads to the journal). Then every file and
// acknowledged record is there, live and after a cold `cryptsetup open`
// with the passphrase; the data starts 1016 KiB earlier; the old volume
// key and the other passphrase no longer open the volume.
func TestGuestRekeyLUKS1(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st, name := luksStackFormat(t, "rk1", d[5], state, "40m", "8m", "--type", "luks1", "--cipher", "aes-xts-plain64", "--key-size", "256")
	os.WriteFile("/tmp/rk1-other-pw", []byte("another passphrase"), 0o600)
	sh(t, "cryptsetup", "luksAddKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", pwFile, st.Disk, "/tmp/rk1-other-pw")
	luks1Dump(t, st.Disk, 4096, "0 1")
	oldKey := saveVolumeKey(t, st.Disk, "/tmp/rk1-old.key")
	j := st.file(state, "journal")

	// Refusals and a dry run, with the disk quiet.
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	refused(t, st.Disk, 2, "camellia-xts-plain64",
		"rekey", name, "--batch-mode", "--remove-other-keyslots", "--key-file", pwFile, "--journal", j, "--cipher", "camellia-xts-plain64")
	refused(t, st.Disk, 2, "keyslot 1 is not opened", "rekey", name, "--batch-mode", "--key-file", pwFile, "--journal", j)
	before := diskBytes(t, st.Disk)
	code, out := cliRun(t, "rekey", name, "--dry-run", "--remove-other-keyslots", "--key-file", pwFile, "--journal", j)
	requireExit(t, "rekey --dry-run", code, 0, out)
	if !strings.Contains(out, "(LUKS1, aes-xts-plain64") || !strings.Contains(out, "moving 1016.0 KiB toward the start") ||
		!strings.Contains(out, "keyslot 1 is removed") {
		t.Fatalf("the dry run's plan:\n%s", out)
	}
	code, out = cliRun(t, "rekey", name, "--dry-run", "--json", "--remove-other-keyslots", "--key-file", pwFile, "--journal", j)
	requireExit(t, "rekey --dry-run --json", code, 0, out)
	if !strings.Contains(out, `"luks_version":1`) {
		t.Fatalf("the JSON plan does not say LUKS1:\n%s", out)
	}
	if !bytes.Equal(before, diskBytes(t, st.Disk)) {
		t.Fatal("rekey --dry-run changed the disk")
	}
	if _, err := os.Stat(j); err == nil {
		t.Fatal("a refused or dry rekey created the journal")
	}
	for i, mp := range st.Mounts {
		sh(t, "mount", "/dev/mapper/"+st.VG+"-"+st.FSLVs[i], mp)
	}

	w := startWriter(t, st, state)
	rekey := func(journal string) *running {
		// 4M asks for more than the keyslots leave: the gap is 1016 KiB.
		return cliStart(t, "rekey", name, "--remove-other-keyslots", "--batch-mode", "--json", "--key-file", pwFile, "--journal", journal, "--chunk-size", "4M")
	}
	// First run: SIGTERM, then abort back to the old key.
	r := rekey(j)
	r.waitProgress(t, 0.3)
	r.cmd.Process.Signal(syscall.SIGTERM)
	code, errOut := r.wait()
	requireExit(t, "rekey after SIGTERM", code, 5, errOut)
	notLUKS(t, st.Disk)
	code, out = cliRun(t, "status", "--journal", j)
	requireExit(t, "status of the interrupted rekey", code, 0, out)
	code, out = cliRun(t, "abort", "--journal", j, "--key-file", pwFile)
	requireExit(t, "abort of the rekey", code, 0, out)
	luks1Dump(t, st.Disk, 4096, "0 1")
	if k := saveVolumeKey(t, st.Disk, "/tmp/rk1-after-abort.key"); !bytes.Equal(k, oldKey) {
		t.Fatal("the aborted rekey changed the volume key")
	}
	sh(t, "cryptsetup", "open", "--test-passphrase", "--key-file", "/tmp/rk1-other-pw", st.Disk)

	// Second run: kill -9 mid-run, then resume naming only the disk.
	j2 := st.file(state, "journal2")
	r = rekey(j2)
	r.waitProgress(t, 0.4)
	r.cmd.Process.Kill()
	code, _ = r.wait()
	requireExit(t, "rekey after kill -9", code, 128+int(syscall.SIGKILL), "")
	notLUKS(t, st.Disk)
	code, out = cliRun(t, "status", st.Disk)
	requireExit(t, "status of the killed rekey", code, 0, out)
	if !strings.Contains(out, j2) || !strings.Contains(out, "LUKS1 header of a dmconvert run in progress; its checkpoint: rekey run") {
		t.Fatalf("status %s does not read the checkpoint and the journal %s from the disk:\n%s", st.Disk, j2, out)
	}
	code, out = cliRun(t, "resume", st.Disk, "--key-file", pwFile)
	requireExit(t, "resume of the rekey", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	verifyEncryptedCold(t, st, state, name)
	checkRekeyed(t, st.Disk, oldKey, "/tmp/rk1-old.key")
	dump := luks1Dump(t, st.Disk, 4096-2032, "2")
	if out, err := shOK("cryptsetup", "open", "--test-passphrase", "--key-file", "/tmp/rk1-other-pw", st.Disk); err == nil {
		t.Fatalf("the removed keyslot's passphrase still opens %s:\n%s", st.Disk, out)
	}
	if nk := saveVolumeKey(t, st.Disk, "/tmp/rk1-new.key"); len(nk) != 32 {
		t.Fatalf("the new volume key has %d bytes, want 32", len(nk))
	}
	t.Logf("the rekeyed header:\n%s", dump)
}

// TestGuestRekeyLUKS1DefaultKey: cryptsetup's default LUKS1 layout (a
// 512-bit key: the keyslot material ends at sector 4036, leaving 24 KiB
// before the data) on a 28 MiB partition, with a second keyslot opened by
// a key file, an ext4 mounted on the mapping, rekeyed under a writer in
// place (no room to move the data: each 1 MiB chunk's old ciphertext goes
// to the journal first) keeping the key file (--also-key-file), killed
// with SIGKILL mid-run, resumed with the key file alone; checked live and
// after a cold open; the data offset and the mapping's size are
// unchanged, both the passphrase and the key file open the new key. The
// rate of the resumed part is logged.
func TestGuestRekeyLUKS1DefaultKey(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	sh(t, "sh", "-c", "printf 'label: gpt\\n,28M\\n' | sfdisk -q "+d[6])
	disk := d[6] + "1"
	for i := 0; i < 50; i++ {
		if _, err := os.Stat(disk); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	tag := "rk1d"
	name := tag + "-crypt"
	sh(t, "cryptsetup", "luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--key-file", pwFile, disk)
	luks1Dump(t, disk, 4096, "0")
	kf := "/tmp/rk1d-keyfile"
	os.WriteFile(kf, bytes.Repeat([]byte{0x6b, 0x00, 0xe2}, 700), 0o600)
	sh(t, "cryptsetup", "luksAddKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", pwFile, disk, kf)
	oldKey := saveVolumeKey(t, disk, "/tmp/rk1d-old.key")
	if len(oldKey) != 64 {
		t.Fatalf("cryptsetup's default LUKS1 key has %d bytes here, want 64", len(oldKey))
	}
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	dev := "/dev/mapper/" + name
	st := fsStack(t, tag, disk, state, name, "-E", "lazy_itable_init=0,lazy_journal_init=0")
	mp := st.Mounts[0]
	j := st.file(state, "journal")
	code, out := cliRun(t, "rekey", dev, "--dry-run", "--key-file", pwFile, "--also-key-file", kf, "--journal", j)
	requireExit(t, "rekey --dry-run", code, 0, out)
	if !strings.Contains(out, "where it is (data offset 2.0 MiB), 1.0 MiB at a time with the mapping suspended") {
		t.Fatalf("the dry run does not plan an in-place rekey:\n%s", out)
	}
	w := startWriter(t, st, state)
	killLUKS1Rekey(t, disk, "rekey", dev, "--batch-mode", "--json", "--key-file", pwFile, "--also-key-file", kf, "--journal", j)
	t0 := time.Now()
	code, out = cliRun(t, "resume", "--journal", j, "--key-file", kf)
	el := time.Since(t0)
	requireExit(t, "resume of the LUKS1 rekey", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("resume: the rest of %.1f MiB in %v (%.2f MiB/s over the whole volume's size); writer: %d acknowledged writes",
		float64(st.Sizes[0])/(1<<20), el.Round(time.Millisecond), float64(st.Sizes[0])/(1<<20)/el.Seconds(), acks)
	// In place: the mapping keeps its size, the data its offset.
	if got := blockDevBytes(t, dev); got != st.Sizes[0] {
		t.Fatalf("the rekeyed mapping is %d bytes, want %d", got, st.Sizes[0])
	}
	verifyStack(t, st, state)
	sh(t, "umount", mp)
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	sh(t, "mount", dev, mp)
	verifyStack(t, st, state)
	checkRekeyed(t, disk, oldKey, "/tmp/rk1d-old.key")
	// The new key waited in the first free keyslots, one per passphrase.
	luks1Dump(t, disk, 4096, "2 3")
	os.Remove("/tmp/rk1d-kf.key")
	sh(t, "cryptsetup", "luksDump", "-q", "--dump-volume-key", "--volume-key-file", "/tmp/rk1d-kf.key", "--key-file", kf, disk)
	if b, _ := os.ReadFile("/tmp/rk1d-kf.key"); !bytes.Equal(b, saveVolumeKey(t, disk, "/tmp/rk1d-new.key")) {
		t.Fatal("the key file given with --also-key-file does not open the new volume key")
	}
}

// TestGuestRekeyLUKS1FS: an ext4 mounted directly on a LUKS1 mapping of
// a weak cipher (aes-cbc-essiv:sha256 with a 256-bit key, two keyslots)
// is rekeyed under a writer to aes-xts-plain64 with a 512-bit key,
// keeping the second keyslot's passphrase out (--remove-other-keyslots):
// in place, the new key staged where the 512-bit keyslot layout puts its
// keyslot. Killed with SIGKILL mid-run (the disguised header: stock
// cryptsetup opens nothing), resumed; checked live, after a cold open
// with the passphrase (cryptsetup sees the new cipher and key size, the
// data where it was), the old volume key and the removed passphrase open
// nothing.
func TestGuestRekeyLUKS1FS(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	disk := d[15]
	tag := "rk1f"
	name := tag + "-crypt"
	sh(t, "cryptsetup", "luksFormat", "-q", "--type", "luks1", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256",
		"--pbkdf-force-iterations", "1000", "--key-file", pwFile, disk)
	os.WriteFile("/tmp/rk1f-other", []byte("another LUKS1 passphrase"), 0o600)
	sh(t, "cryptsetup", "luksAddKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", pwFile, disk, "/tmp/rk1f-other")
	oldKey := saveVolumeKey(t, disk, "/tmp/rk1f-old.key")
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	dev := "/dev/mapper/" + name
	st := fsStack(t, tag, disk, state, name, "-E", "lazy_itable_init=0,lazy_journal_init=0")
	mp := st.Mounts[0]
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	code, out := cliRun(t, "rekey", name, "--dry-run", "--remove-other-keyslots", "--key-file", pwFile, "--journal", j, "--cipher", "aes-xts-plain64", "--key-size", "512")
	requireExit(t, "rekey --dry-run", code, 0, out)
	if !strings.Contains(out, "aes-cbc-essiv:sha256 with a 256-bit key, 512-byte sectors; changes to aes-xts-plain64 with a 512-bit key") ||
		!strings.Contains(out, "where it is (data offset 2.0 MiB)") {
		t.Fatalf("the dry run does not plan an in-place rekey to aes-xts-plain64/512:\n%s", out)
	}
	killLUKS1Rekey(t, disk, "rekey", name, "--remove-other-keyslots", "--batch-mode", "--json", "--key-file", pwFile, "--journal", j,
		"--chunk-size", "512K", "--cipher", "aes-xts-plain64", "--key-size", "512")
	code, out = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the LUKS1 rekey", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	// In place: the mapping keeps its size; its table has the new cipher.
	if got := blockDevBytes(t, dev); got != st.Sizes[0] {
		t.Fatalf("the rekeyed mapping is %d bytes, want %d", got, st.Sizes[0])
	}
	if tb := sh(t, "dmsetup", "table", name); !strings.Contains(tb, " crypt aes-xts-plain64 ") {
		t.Fatalf("%s after the rekey: %s", name, tb)
	}
	verifyStack(t, st, state)
	sh(t, "umount", mp)
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	sh(t, "mount", dev, mp)
	verifyStack(t, st, state)
	if status := sh(t, "cryptsetup", "status", name); !regexp.MustCompile(`cipher:\s+aes-xts-plain64\n`).MatchString(status) ||
		!regexp.MustCompile(`keysize:\s+512 bits`).MatchString(status) {
		t.Fatalf("cryptsetup status after a cold open:\n%s", status)
	}
	checkRekeyed(t, disk, oldKey, "/tmp/rk1f-old.key")
	if out, err := shOK("cryptsetup", "open", "--test-passphrase", "--key-file", "/tmp/rk1f-other", disk); err == nil {
		t.Fatalf("the removed keyslot's passphrase still opens %s:\n%s", disk, out)
	}
	// The new key waited in keyslot 2: the first free one whose area in
	// the 512-bit layout is clear of keyslots 0 and 1 of the 256-bit one.
	t.Logf("the rekeyed header:\n%s", luks1Dump(t, disk, 4096, "2"))
}

// killLUKS1Rekey starts dmconvert with args (a LUKS1 rekey of disk),
// kills it with SIGKILL a third of the way, and checks that stock
// cryptsetup then opens nothing on the disk (its header is disguised).
func killLUKS1Rekey(t testing.TB, disk string, args ...string) {
	t.Helper()
	r := cliStart(t, args...)
	r.waitProgress(t, 0.3)
	r.cmd.Process.Kill()
	code, _ := r.wait()
	requireExit(t, "LUKS1 rekey after kill -9", code, 128+int(syscall.SIGKILL), "")
	if out, err := shOK("cryptsetup", "open", "--test-passphrase", "--key-file", pwFile, disk); err == nil {
		t.Fatalf("stock cryptsetup opens the half-rekeyed LUKS1 disk:\n%s", out)
	}
}
