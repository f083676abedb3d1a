package convert

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/luks"
	"github.com/dmconvert/dmconvert/testvm"
)

// Real-kernel tests of `dmconvert rekey --header FILE` on TrueCrypt
// volumes made by Debian's tcplay and opened by stock cryptsetup (open
// --type tcrypt, the passphrase on standard input): an ext4 mounted on the
// mapping, and an LVM PV on it with a mounted ext4 and a raw LV, under a
// writer; killed mid-run and torn down as by a reboot, then resumed; or
// stopped and aborted back to the TrueCrypt volume. Every file and
// acknowledged record is checked live and after a cold open by stock
// cryptsetup with the new detached header and the passphrase; the old
// volume key no longer opens the volume, and neither does the TrueCrypt
// passphrase through the old headers.

// tcplayCreate makes a TrueCrypt volume on disk with tcplay, its PRF and
// cipher as tcplay's -a and -b take them (e.g. "SHA512", "AES-256-XTS"), which reads its passphrase from a terminal: script(1)
// gives it one, and each answer is typed after its prompt (tcplay flushes
// what was typed before it asks).
func tcplayCreate(t testing.TB, disk, prf, cipher string, pass []byte, extra ...string) {
	t.Helper()
	cmd := exec.Command("script", "-qec", strings.Join(append([]string{"tcplay -c -d " + disk + " -a " + prf + " -b " + cipher + " --insecure-erase"}, extra...), " "), "/dev/null")
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	var mu sync.Mutex
	var out bytes.Buffer
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := pr.Read(buf)
			mu.Lock()
			out.Write(buf[:n])
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	answers := []struct{ prompt, answer string }{
		{"Passphrase:", string(pass) + "\n"},
		{"Repeat passphrase:", string(pass) + "\n"},
		{"(y/n)", "y\n"},
	}
	seen := 0
	deadline := time.Now().Add(3 * time.Minute)
	for _, a := range answers {
		for {
			mu.Lock()
			s := out.String()
			mu.Unlock()
			if i := strings.Index(s[seen:], a.prompt); i >= 0 {
				seen += i + len(a.prompt)
				break
			}
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				t.Fatalf("tcplay -c on %s never asked %q:\n%s", disk, a.prompt, s)
			}
			time.Sleep(50 * time.Millisecond)
		}
		time.Sleep(200 * time.Millisecond) // the prompt is printed before the terminal is set up
		io.WriteString(in, a.answer)
	}
	werr := cmd.Wait()
	pw.Close()
	mu.Lock()
	s := out.String()
	mu.Unlock()
	if werr != nil || !strings.Contains(s, "All done") {
		t.Fatalf("tcplay -c on %s: %v\n%s", disk, werr, s)
	}
}

// tcryptKDFFlags restrict cryptsetup to the KDF tcplayCreate uses
// by default (TrueCrypt's PBKDF2-SHA512); tcryptKDF to another one
// (cryptsetup's hash name).
var tcryptKDFFlags = tcryptKDF("sha512")

func tcryptKDF(hash string) []string { return []string{"--disable-veracrypt", "--hash", hash} }

// tcryptOpen opens disk as cryptsetup opens a TrueCrypt volume made with
// PBKDF2-hash, the passphrase on standard input.
func tcryptOpen(t testing.TB, disk, name, hash string, extra ...string) {
	t.Helper()
	shIn(t, guestPass, "cryptsetup", append(append(append([]string{"open", "--type", "tcrypt"}, tcryptKDF(hash)...), extra...), disk, name)...)
	if st := sh(t, "cryptsetup", "status", name); !strings.Contains(st, "type:    TCRYPT") || !strings.Contains(st, "offset:  256 sectors") {
		t.Fatalf("cryptsetup status %s is not a TrueCrypt volume with its data at 256:\n%s", name, st)
	}
}

// checkTCryptConverted: the detached header is a finished LUKS2 header
// with its data at 0; the old volume key does not open the volume with
// it; the TrueCrypt passphrase opens neither the old header nor its
// backup; the live mapping is the header's.
func checkTCryptConverted(t testing.TB, disk, name, hdr string, oldKey []byte, kdf ...string) {
	t.Helper()
	dump := sh(t, "cryptsetup", "luksDump", hdr)
	if !strings.Contains(dump, "offset: 0 [bytes]") || strings.Contains(dump, "dmconvert") {
		t.Fatalf("the detached header is not a finished one with its data at offset 0:\n%s", dump)
	}
	if tb := strings.Fields(sh(t, "dmsetup", "table", name)); len(tb) < 8 || tb[5] != "0" || tb[7] != "0" {
		t.Fatalf("the converted mapping does not start at sector 0 with IV 0: %v", tb)
	}
	kf := "/tmp/tcrypt-old-volume.key"
	writeFileSync(t, kf, oldKey)
	if out, err := shOK("cryptsetup", "open", "--header", hdr, "--volume-key-file", kf, disk, "tc-oldkey"); err == nil {
		shOK("cryptsetup", "close", "tc-oldkey")
		t.Fatalf("the old volume key opens the converted volume:\n%s", out)
	}
	for _, args := range [][]string{{"tcryptDump", disk}, {"tcryptDump", "--tcrypt-backup", disk}} {
		// The volume's own KDF only (kdf, default tcryptKDFFlags):
		// every VeraCrypt KDF takes minutes on the emulated CPU.
		if kdf == nil {
			kdf = tcryptKDFFlags
		}
		cmd := exec.Command("cryptsetup", append(append([]string{}, kdf...), args...)...)
		cmd.Stdin = bytes.NewReader(guestPass)
		if out, err := cmd.CombinedOutput(); err == nil {
			t.Fatalf("cryptsetup %s still opens a TrueCrypt header with the passphrase:\n%s", strings.Join(args, " "), out)
		}
	}
}

// tcryptTeardown removes what a reboot would: the mapping and any
// helper a killed run left.
func tcryptTeardown(t testing.TB, name string) {
	t.Helper()
	sh(t, "dmsetup", "remove", name)
	for _, l := range strings.Split(sh(t, "dmsetup", "ls"), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "dmconvert-") {
			sh(t, "dmsetup", "remove", f[0])
		}
	}
}

// TestGuestRekeyTCryptFS: an ext4 mounted on a TrueCrypt volume (PBKDF2-Whirlpool, Twofish-XTS) becomes
// LUKS2 with a detached header under a writer: a dry run and a run with a
// wrong passphrase change nothing; the run is killed with SIGKILL, torn
// down as by a reboot (cryptsetup no longer opens it as TrueCrypt),
// resumed (the old key from the TrueCrypt header the journal kept, with
// the passphrase; a wrong one refused); checked live and after a cold
// open with the header.
func TestGuestRekeyTCryptFS(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	disk := d[10]
	tag := "tfs"
	name := tag + "-crypt"
	hdr := "/tmp/tfs.hdr"
	// Whirlpool (TrueCrypt's 1000 iterations) and Twofish: the PRF and
	// cipher no other test converts.
	tcplayCreate(t, disk, "whirlpool", "TWOFISH-256-XTS", guestPass)
	tcryptOpen(t, disk, name, "whirlpool")
	oldKey := tableKey(t, name)
	dev := "/dev/mapper/" + name
	st := fsStack(t, tag, disk, state, name, "-E", "lazy_itable_init=0,lazy_journal_init=0")
	mp := st.Mounts[0]
	j := st.file(state, "journal")
	sh(t, "sync")
	before := diskBytes(t, disk)
	code, out := cliRun(t, "rekey", name, "--dry-run", "--header", hdr, "--key-file", pwFile, "--journal", j)
	requireExit(t, "TrueCrypt conversion --dry-run", code, 0, out)
	if !strings.Contains(out, "Dry run") || !strings.Contains(out, "TrueCrypt") || !strings.Contains(out, "moved to sector 0") {
		t.Fatalf("TrueCrypt conversion --dry-run printed no plan:\n%s", out)
	}
	// (A wrong passphrase at the start tries every TrueCrypt and
	// VeraCrypt KDF: minutes on the emulated CPU; the fake-kernel
	// TestTCryptRefusals checks that refusal.)
	if !bytes.Equal(before, diskBytes(t, disk)) {
		t.Fatal("a dry run changed the disk")
	}
	for _, p := range []string{j, hdr} {
		if _, err := os.Stat(p); err == nil {
			t.Fatalf("a dry run created %s", p)
		}
	}
	wrong := "/tmp/tfs-wrong.pw"
	writeFileSync(t, wrong, []byte("not the passphrase"))
	w := startWriter(t, st, state)
	r := cliStart(t, "rekey", dev, "--header", hdr, "--key-file", pwFile, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--batch-mode", "--json", "--journal", j)
	r.waitProgress(t, 0.3)
	r.cmd.Process.Kill()
	code, _ = r.wait()
	requireExit(t, "TrueCrypt conversion after kill -9", code, 128+int(syscall.SIGKILL), "")
	// The kill may land inside a table swap, the writer then blocked.
	cutIfLeftSuspended(t, w)
	acks, gap := w.finish(t)
	t.Logf("writer: %d acknowledged writes, longest gap %v", acks, gap)
	sh(t, "umount", mp)
	tcryptTeardown(t, name)
	if out, err := shIn2(guestPass, "cryptsetup", append(append([]string{"open", "--type", "tcrypt"}, tcryptKDF("whirlpool")...), disk, "tfs-early")...); err == nil {
		shOK("cryptsetup", "close", "tfs-early")
		t.Fatalf("stock cryptsetup opened the half-converted volume as TrueCrypt:\n%s", out)
	}
	if out, err := shOK("cryptsetup", "open", "--header", hdr, "--key-file", pwFile, disk, "tfs-early"); err == nil {
		shOK("cryptsetup", "close", "tfs-early")
		t.Fatalf("stock cryptsetup opened the volume with the half-made header:\n%s", out)
	}
	code, out = cliRun(t, "resume", "--journal", j, "--key-file", wrong)
	if code == 0 || !strings.Contains(out, hdr) {
		t.Fatalf("resume with a wrong passphrase: exit %d\n%s", code, out)
	}
	code, out = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the TrueCrypt conversion after a teardown", code, 0, out)
	if !strings.Contains(out, "luks,header="+hdr) {
		t.Fatalf("resume printed no crypttab line:\n%s", out)
	}
	// The mapping now runs to the end of the disk, as cryptsetup maps
	// the LUKS2 segment (it grew by the old header areas).
	if got, want := blockDevBytes(t, dev), blockDevBytes(t, disk); got != want {
		t.Fatalf("the converted mapping is %d bytes, want the whole disk's %d", got, want)
	}
	st.Sizes[0] = blockDevBytes(t, dev)
	sh(t, "mount", dev, mp)
	verifyStack(t, st, state)
	checkTCryptConverted(t, disk, name, hdr, oldKey, tcryptKDF("whirlpool")...)
	// Cold: stock cryptsetup with the header and the passphrase.
	sh(t, "umount", mp)
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--header", hdr, "--key-file", pwFile, disk, name)
	sh(t, "mount", dev, mp)
	verifyStack(t, st, state)
}

// shIn2 runs a command with stdin, returning its output and error.
func shIn2(stdin []byte, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Stdin = bytes.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestGuestRekeyTCryptLVM: a PV with live LVs on a TrueCrypt volume made
// with a passphrase and a keyfile (tcplay -k; cryptsetup --key-file,
// dmconvert --tcrypt-keyfile). A conversion stopped with SIGTERM is
// aborted under the writer (the keyfile read again from the path the run
// recorded): the volume is the TrueCrypt volume it was (stock cryptsetup
// opens it cold with the passphrase and the keyfile). A second run
// converts it whole; checked live and after a cold open with the header.
func TestGuestRekeyTCryptLVM(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	disk := d[11]
	tag := "tlv"
	name := "vg" + tag + "_crypt"
	hdr := "/tmp/tlv.hdr"
	kf := "/tmp/tlv.keyfile"
	kfb := make([]byte, 1500)
	rand.Read(kfb)
	writeFileSync(t, kf, kfb)
	st := tcryptLVMStackKeyfile(t, tag, disk, state, "16m", "4m", kf)
	oldKey := tableKey(t, name)
	vg := st.VG
	lv := "/dev/mapper/" + vg + "-ext"
	mp := st.Mounts[0]
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	r := cliStart(t, "rekey", name, "--header", hdr, "--key-file", pwFile, "--tcrypt-keyfile", kf, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--batch-mode", "--json", "--journal", j)
	r.waitProgress(t, 0.4)
	r.cmd.Process.Signal(syscall.SIGTERM)
	code, errOut := r.wait()
	requireExit(t, "TrueCrypt conversion after SIGTERM", code, 5, errOut)
	code, out := cliRun(t, "abort", "--journal", j, "--key-file", pwFile)
	requireExit(t, "abort of the TrueCrypt conversion", code, 0, out)
	acks, gap := w.finish(t)
	t.Logf("writer through the stop and the abort: %d acknowledged writes, longest gap %v", acks, gap)
	verifyStack(t, st, state)
	if !bytes.Equal(tableKey(t, name), oldKey) {
		t.Fatal("after the abort the mapping does not use the TrueCrypt key")
	}
	// Cold: the TrueCrypt volume opens as it did.
	sh(t, "umount", mp)
	sh(t, "vgchange", "-an", vg)
	sh(t, "cryptsetup", "close", name)
	tcryptOpen(t, disk, name, "sha512", "--key-file", kf)
	sh(t, "vgchange", "-ay", vg)
	sh(t, "mount", lv, mp)
	verifyStack(t, st, state)

	// A second run, to the end.
	os.Remove(hdr)
	j2 := st.file(state, "journal2")
	w = startWriter(t, st, state)
	code, out = cliRun(t, "rekey", name, "--header", hdr, "--key-file", pwFile, "--tcrypt-keyfile", kf, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--batch-mode", "--journal", j2)
	requireExit(t, "TrueCrypt conversion", code, 0, out)
	acks, gap = w.finish(t)
	t.Logf("writer during the conversion: %d acknowledged writes, longest gap %v", acks, gap)
	verifyStack(t, st, state)
	checkTCryptConverted(t, disk, name, hdr, oldKey, append(append([]string{}, tcryptKDFFlags...), "--key-file", kf)...)
	sh(t, "umount", mp)
	sh(t, "vgchange", "-an", vg)
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--header", hdr, "--key-file", pwFile, disk, name)
	sh(t, "vgchange", "-ay", vg)
	sh(t, "mount", lv, mp)
	verifyStack(t, st, state)
}

// tcryptLVMStack makes disk a TrueCrypt volume with tcplay, opens it as
// <VG>_crypt (VG vg<tag>) with stock cryptsetup and builds a PV on it with
// an ext4 LV (mounted) and a raw LV (1 MiB extents).
func tcryptLVMStack(t testing.TB, tag, disk, state, extSize, rawSize string) *stack {
	t.Helper()
	return tcryptLVMStackKeyfile(t, tag, disk, state, extSize, rawSize, "")
}

// tcryptLVMStackKeyfile is tcryptLVMStack with a keyfile too (if kf is
// not empty).
func tcryptLVMStackKeyfile(t testing.TB, tag, disk, state, extSize, rawSize, kf string) *stack {
	t.Helper()
	vg := "vg" + tag
	name := vg + "_crypt"
	var create, open []string
	if kf != "" {
		create, open = []string{"-k", kf}, []string{"--key-file", kf}
	}
	tcplayCreate(t, disk, "SHA512", "AES-256-XTS", guestPass, create...)
	tcryptOpen(t, disk, name, "sha512", open...)
	m := "/dev/mapper/" + name
	sh(t, "pvcreate", "-y", m)
	sh(t, "vgcreate", "-y", "-s", "1m", vg, m)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", extSize, vg)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", rawSize, vg)
	return extRawStack(t, tag, disk, state, vg, 0, "-E", "lazy_itable_init=0,lazy_journal_init=0")
}

// tcryptPowerCutResume is the second boot of a TrueCrypt conversion's
// power cut: nothing is open; boot-time LVM finds nothing on the raw
// disk; before the run recorded anything the TrueCrypt volume opens as it
// was; mid-run stock cryptsetup refuses the detached header (marked) and
// resume finishes (the old key from the journal's TrueCrypt header and
// the passphrase); a finished run opens with the header. Every
// acknowledged write is there.
func tcryptPowerCutResume(t *testing.T, st *stack, state, jpath string) {
	name := st.VG + "_crypt"
	hdr := filepath.Join(state, "pc.hdr")
	converted := true
	switch headerlessCutState(t, st, jpath, pcTCrypt) {
	case cutNotStarted:
		// (The header file may exist, still marked: it is written
		// before the journal.)
		tcryptOpen(t, st.Disk, name, "sha512")
		converted = false
	case cutDone:
		sh(t, "cryptsetup", "open", "--header", hdr, "--key-file", pwFile, st.Disk, name)
	default:
		if out, err := shOK("cryptsetup", "open", "--header", hdr, "--key-file", pwFile, st.Disk, "pc-early"); err == nil {
			shOK("cryptsetup", "close", "pc-early")
			t.Fatalf("stock cryptsetup opened the half-converted volume with its header:\n%s", out)
		}
		code, out := cliRun(t, "resume", "--journal", jpath, "--key-file", pwFile)
		requireExit(t, "resume after the power cut", code, 0, out)
	}
	sh(t, "vgchange", "-ay", st.VG)
	verifyStack(t, st, state)
	if converted {
		if dump := sh(t, "cryptsetup", "luksDump", hdr); !strings.Contains(dump, "offset: 0 [bytes]") || strings.Contains(dump, "dmconvert") {
			t.Fatalf("the detached header is not a finished one with its data at offset 0:\n%s", dump)
		}
	}
}

// TestGuestRekeyTCryptVeraCrypt: a VeraCrypt volume (PBKDF2-SHA512 with
// VeraCrypt's 500000 iterations; its header written by luks.CreateTCrypt,
// as tcplay makes TrueCrypt ones only) opened by stock cryptsetup with
// --veracrypt, an ext4 mounted on it, becomes LUKS2 under a writer;
// checked live and after a cold open with the header.
func TestGuestRekeyTCryptVeraCrypt(t *testing.T) {
	testvm.RequireGuest(t)
	veraCryptRekey(t, testvm.GuestDisks()[12], "tvc", 0, "")
}

// TestGuestRekeyTCryptVeraCryptPIM: the same with a Serpent-XTS
// VeraCrypt volume made with a PIM (3: 18000 iterations), opened by
// cryptsetup --veracrypt-pim and converted with dmconvert rekey
// --veracrypt-pim: the LUKS2 volume keeps Serpent.
func TestGuestRekeyTCryptVeraCryptPIM(t *testing.T) {
	testvm.RequireGuest(t)
	veraCryptRekey(t, testvm.GuestDisks()[14], "tvp", 3, "serpent-xts-plain64")
}

// veraCryptRekey makes a VeraCrypt volume on disk (with pim, if not 0;
// with cipher, "" for AES-XTS), an ext4 on it, and converts it under a
// writer.
func veraCryptRekey(t *testing.T, disk, tag string, pim int, cipher string) {
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	name := tag + "-crypt"
	hdr := "/tmp/" + tag + ".hdr"
	size := int64(blockDevBytes(t, disk))
	key := make([]byte, 64)
	rand.Read(key)
	iter := 0
	if pim > 0 {
		iter = luks.TCryptPIMIterations(pim)
	}
	h, err := luks.CreateTCrypt(luks.TCryptParams{VeraCrypt: true, PRF: "sha512", Cipher: cipher, Key: key, DataOffset: 128 << 10, Iterations: iter,
		DataSize: size - 256<<10, VolumeSize: size - 256<<10}, guestPass)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, size - 128<<10} { // the header and its backup
		if _, err := f.WriteAt(h, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := errors.Join(f.Sync(), f.Close()); err != nil {
		t.Fatal(err)
	}
	vc := []string{"--veracrypt", "--hash", "sha512"}
	var pimArgs []string
	if pim > 0 {
		vc = append(vc, "--veracrypt-pim", strconv.Itoa(pim))
		pimArgs = []string{"--veracrypt-pim", strconv.Itoa(pim)}
	}
	shIn(t, guestPass, "cryptsetup", append(append([]string{"open", "--type", "tcrypt"}, vc...), disk, name)...)
	if !bytes.Equal(tableKey(t, name), key) {
		t.Fatal("stock cryptsetup opened the VeraCrypt volume with another key")
	}
	if uuid := strings.TrimSpace(sh(t, "dmsetup", "info", "-c", "--noheadings", "-o", "uuid", name)); !strings.HasPrefix(uuid, "CRYPT-TCRYPT-") {
		t.Fatalf("cryptsetup's VeraCrypt mapping has uuid %q", uuid)
	}
	dev := "/dev/mapper/" + name
	st := fsStack(t, tag, disk, state, name, "-E", "lazy_itable_init=0,lazy_journal_init=0")
	mp := st.Mounts[0]
	w := startWriter(t, st, state)
	code, out := cliRun(t, append([]string{"rekey", name, "--header", hdr, "--key-file", pwFile, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--batch-mode", "--journal", st.file(state, "journal")}, pimArgs...)...)
	requireExit(t, "VeraCrypt conversion", code, 0, out)
	acks, gap := w.finish(t)
	t.Logf("writer: %d acknowledged writes, longest gap %v", acks, gap)
	st.Sizes[0] = blockDevBytes(t, dev)
	verifyStack(t, st, state)
	checkTCryptConverted(t, disk, name, hdr, key, vc...)
	sh(t, "umount", mp)
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--header", hdr, "--key-file", pwFile, disk, name)
	sh(t, "mount", dev, mp)
	verifyStack(t, st, state)
	if cipher != "" {
		if dump := sh(t, "cryptsetup", "luksDump", hdr); !regexp.MustCompile(`(?m)^\s+cipher:\s+` + regexp.QuoteMeta(cipher) + `$`).MatchString(dump) {
			t.Fatalf("the converted volume's segment is not %s:\n%s", cipher, dump)
		}
	}
}

// TestGuestRekeyTCryptCascade: a TrueCrypt volume made by tcplay with a
// cipher cascade (Twofish and AES), opened by cryptsetup as one device
// per cipher, is refused by name and reason with nothing written, and no
// detached header is left behind.
func TestGuestRekeyTCryptCascade(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	disk, name, hdr := d[18], "tcc-crypt", "/tmp/tcc.hdr"
	tcplayCreate(t, disk, "SHA512", "TWOFISH-256-XTS,AES-256-XTS", guestPass)
	shIn(t, guestPass, "cryptsetup", append(append([]string{"open", "--type", "tcrypt"}, tcryptKDF("sha512")...), disk, name)...)
	defer shOK("cryptsetup", "close", name)
	table := sh(t, "dmsetup", "table", name)
	if !strings.Contains(table, " crypt ") || !strings.Contains(sh(t, "dmsetup", "ls"), name+"_1") {
		t.Fatalf("cryptsetup did not map a cascade (%s over %s_1):\n%s", name, name, table)
	}
	refusedNaming(t, disk, name, 2, "cipher cascade", "rekey", name, "--header", hdr, "--key-file", pwFile, "--journal", filepath.Join(state, "tcc-journal"))
	if _, err := os.Stat(hdr); err == nil {
		t.Fatalf("the refused conversion left %s", hdr)
	}
}
