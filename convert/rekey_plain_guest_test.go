package convert

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/dmconvert/dmconvert/luks"
	"github.com/dmconvert/dmconvert/testvm"
)

// Real-kernel tests of `dmconvert rekey` on plain dm-crypt mappings made
// by stock cryptsetup (open --type plain with a key file): an ext4
// mounted on the mapping, and an LVM PV on it with a mounted ext4 and a
// raw LV, under a writer; killed or stopped mid-run, the mappings torn
// down as after a reboot, then resumed or aborted; every file and
// acknowledged record is checked live and after a cold open by stock
// cryptsetup with the new key file, and the old key no longer shows
// anything on the disk.

// plainOpen opens disk as a plain mapping of keyFile, as crypttab would.
// extra: more cryptsetup options (--offset, --skip).
func plainOpen(t testing.TB, disk, name, keyFile string, keyBits string, extra ...string) {
	t.Helper()
	args := append([]string{"open", "--type", "plain", "--cipher", "aes-xts-plain64", "--key-size", keyBits, "--key-file", keyFile}, extra...)
	sh(t, "cryptsetup", append(args, disk, name)...)
}

func randomKeyFile(t testing.TB, path string, n int) []byte {
	t.Helper()
	k := make([]byte, n)
	rand.Read(k)
	writeFileSync(t, path, k)
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	return k
}

// checkPlainRekeyed: the new key file holds a new key of the old size;
// the old key shows nothing on the disk; the live mapping is cryptsetup's
// plain mapping of the new key.
func checkPlainRekeyed(t testing.TB, disk, name string, oldKey []byte, newKeyFile string) {
	t.Helper()
	nk, err := os.ReadFile(newKeyFile)
	if err != nil || len(nk) != len(oldKey) || bytes.Equal(nk, oldKey) {
		t.Fatalf("new key file %s: %d bytes (want %d), same as the old key: %v (%v)", newKeyFile, len(nk), len(oldKey), bytes.Equal(nk, oldKey), err)
	}
	if fi, err := os.Stat(newKeyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("new key file %s: mode %v (%v)", newKeyFile, fi.Mode().Perm(), err)
	}
	if uuid := strings.TrimSpace(sh(t, "dmsetup", "info", "-c", "--noheadings", "-o", "uuid", name)); uuid != "CRYPT-PLAIN-"+name {
		t.Fatalf("%s has uuid %q after the rekey", name, uuid)
	}
	if st := sh(t, "cryptsetup", "status", name); !strings.Contains(st, "type:    PLAIN") {
		t.Fatalf("cryptsetup status %s does not see a plain mapping:\n%s", name, st)
	}
}

// oldKeySeesNothing: the disk opened with the old key carries no file
// system or PV signature.
func oldKeySeesNothing(t testing.TB, disk, oldKeyFile string, extra ...string) {
	t.Helper()
	plainOpen(t, disk, "plain-oldkey", oldKeyFile, "512", extra...)
	typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", "/dev/mapper/plain-oldkey")
	sh(t, "cryptsetup", "close", "plain-oldkey")
	if s := strings.TrimSpace(typ); s != "" {
		t.Fatalf("the old key still shows a %q on %s", s, disk)
	}
}

// tableKey is the key in a live crypt mapping's table.
func tableKey(t testing.TB, name string) []byte {
	t.Helper()
	f := strings.Fields(sh(t, "dmsetup", "table", "--showkeys", name))
	if len(f) < 5 || f[2] != "crypt" {
		t.Fatalf("%s is not a crypt mapping: %d fields", name, len(f))
	}
	k, err := hex.DecodeString(f[4])
	if err != nil {
		t.Fatalf("%s: the table's key is not hex: %v", name, err)
	}
	return k
}

// TestGuestRekeyPlainFS: an ext4 mounted on a plain mapping, opened by
// stock cryptsetup with a passphrase (its default hash), its data 1 MiB
// into the disk (--offset) with IVs counted from 4096 (--skip), is
// rekeyed in place under a writer; a dry run and a run without --new-key-file change
// nothing; the run is killed with SIGKILL mid-run, everything is torn down
// as by a reboot, and resume makes the old key from the passphrase with
// --hash (a wrong passphrase is refused first); checked live, after a
// cold open with the new key file, and the old key shows nothing.
func TestGuestRekeyPlainFS(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	disk := d[7]
	tag := "pfs"
	name := tag + "-crypt"
	oldKeyFile, newKeyFile := "/tmp/pfs-old.key", "/tmp/pfs-new.key"
	pass := "pfs old passphrase"
	where := []string{"--offset", "2048", "--skip", "4096"}
	shIn(t, []byte(pass+"\n"), "cryptsetup", append(append([]string{"open", "--type", "plain", "--cipher", "aes-xts-plain64", "--key-size", "512"}, where...), disk, name)...)
	oldKey := tableKey(t, name)
	writeFileSync(t, oldKeyFile, oldKey) // the same mapping from a key file, for oldKeySeesNothing
	dev := "/dev/mapper/" + name
	st := fsStack(t, tag, disk, state, name, "-E", "lazy_itable_init=0,lazy_journal_init=0")
	mp := st.Mounts[0]
	j := st.file(state, "journal")
	sh(t, "sync")
	// Without --new-key-file: refused, nothing written. A dry run prints
	// the plan and writes nothing (no key file, no journal).
	sh(t, "umount", mp)
	refusedNaming(t, disk, name, 2, "needs a file for its new key", "rekey", name, "--batch-mode", "--journal", j)
	before := diskBytes(t, disk)
	code, out := cliRun(t, "rekey", name, "--dry-run", "--new-key-file", newKeyFile, "--journal", j)
	requireExit(t, "plain rekey --dry-run", code, 0, out)
	if !bytes.Equal(before, diskBytes(t, disk)) || !strings.Contains(out, "Dry run") || !strings.Contains(out, "rewritten in place") {
		t.Fatalf("plain rekey --dry-run changed the disk or printed no plan:\n%s", out)
	}
	for _, p := range []string{j, newKeyFile} {
		if _, err := os.Stat(p); err == nil {
			t.Fatalf("plain rekey --dry-run created %s", p)
		}
	}
	sh(t, "mount", dev, mp)
	w := startWriter(t, st, state)
	r := cliStart(t, "rekey", "/dev/mapper/"+name, "--new-key-file", newKeyFile, "--batch-mode", "--json", "--journal", j, "--chunk-size", "1M")
	r.waitProgress(t, 0.3)
	r.cmd.Process.Kill()
	code, _ = r.wait()
	requireExit(t, "plain rekey after kill -9", code, 128+int(syscall.SIGKILL), "")
	// The kill may land inside a chunk's rewrite, the writer then blocked.
	cutIfLeftSuspended(t, w)
	acks, gap := w.finish(t)
	t.Logf("writer: %d acknowledged writes, longest gap %v", acks, gap)
	// A reboot: no table shows the old key any more.
	sh(t, "umount", mp)
	sh(t, "dmsetup", "remove", name)
	for _, l := range strings.Split(sh(t, "dmsetup", "ls"), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "dmconvert-") {
			sh(t, "dmsetup", "remove", f[0])
		}
	}
	code, out = cliRunIn(t, nil, []byte("not the passphrase\n"), "resume", "--journal", j, "--hash", luks.DefaultPlainHash)
	if code == 0 || !strings.Contains(out, "not the old 512-bit key") {
		t.Fatalf("resume with a wrong passphrase: exit %d\n%s", code, out)
	}
	code, out = cliRunIn(t, nil, []byte(pass+"\n"), "resume", "--journal", j, "--hash", luks.DefaultPlainHash)
	requireExit(t, "resume of the plain rekey after a teardown, old key from the passphrase", code, 0, out)
	if !strings.Contains(out, "plain,cipher=aes-xts-plain64,size=512,offset=2048,skip=4096") {
		t.Fatalf("resume printed no crypttab line with the offset and IV offset:\n%s", out)
	}
	if f := strings.Fields(sh(t, "dmsetup", "table", name)); len(f) < 8 || f[5] != "4096" || f[7] != "2048" {
		t.Fatalf("the rekeyed mapping's IV offset or offset changed: %v", f)
	}
	sh(t, "mount", dev, mp)
	verifyStack(t, st, state)
	checkPlainRekeyed(t, disk, name, oldKey, newKeyFile)
	// Cold: close, open with stock cryptsetup and the new key file.
	sh(t, "umount", mp)
	sh(t, "cryptsetup", "close", name)
	oldKeySeesNothing(t, disk, oldKeyFile, where...)
	plainOpen(t, disk, name, newKeyFile, "512", where...)
	sh(t, "mount", dev, mp)
	verifyStack(t, st, state)
}

// TestGuestRekeyPlainLVM: a PV on a plain mapping with live LVs, rekeyed
// to serpent-xts-plain64 with a 256-bit key under a writer; stopped with
// SIGINT, then everything is torn down as by a reboot (no table shows the
// old key any more); resume refuses the wrong old key, then finishes with
// the right one and activates the LVs again; checked live and cold. A
// second run on the rekeyed volume is stopped and aborted: the volume
// keeps the key of the first run.
func TestGuestRekeyPlainLVM(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	disk := d[8]
	tag := "plv"
	name := "vg" + tag + "_crypt"
	oldKeyFile, newKeyFile := filepath.Join(state, tag+"-old.key"), "/tmp/plv-new.key"
	st := plainLVMStack(t, tag, disk, state, "40m", "8m")
	oldKey, err := os.ReadFile(oldKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	vg := st.VG
	lv := "/dev/mapper/" + vg + "-ext"
	mp := st.Mounts[0]
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	r := cliStart(t, "rekey", name, "--new-key-file", newKeyFile, "--cipher", "serpent-xts-plain64", "--key-size", "256",
		"--batch-mode", "--json", "--journal", j, "--chunk-size", "512K")
	r.waitProgress(t, 0.4)
	r.cmd.Process.Signal(syscall.SIGINT)
	code, errOut := r.wait()
	requireExit(t, "plain rekey after SIGINT", code, 5, errOut)
	acks, _ := w.finish(t)
	t.Logf("writer before the stop: %d acknowledged writes", acks)
	// A reboot: nothing is open any more.
	sh(t, "umount", mp)
	sh(t, "vgchange", "-an", vg)
	sh(t, "dmsetup", "remove", name)
	for _, l := range strings.Split(sh(t, "dmsetup", "ls"), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "dmconvert-") {
			sh(t, "dmsetup", "remove", f[0])
		}
	}
	if out := sh(t, "dmsetup", "ls"); strings.Contains(out, name) || strings.Contains(out, "dmconvert-") {
		t.Fatalf("devices left after the teardown:\n%s", out)
	}
	wrong := "/tmp/plv-wrong.key"
	randomKeyFile(t, wrong, 64)
	code, out := cliRun(t, "resume", "--journal", j, "--old-key-file", wrong)
	if code == 0 || !strings.Contains(out, "not the old 512-bit key") {
		t.Fatalf("resume with a wrong old key: exit %d\n%s", code, out)
	}
	code, out = cliRun(t, "resume", "--journal", j)
	if code == 0 || !strings.Contains(out, "--old-key-file") {
		t.Fatalf("resume without the old key: exit %d\n%s", code, out)
	}
	code, out = cliRun(t, "resume", "--journal", j, "--old-key-file", oldKeyFile)
	requireExit(t, "resume of the plain rekey after a teardown", code, 0, out)
	sh(t, "mount", lv, mp)
	verifyStack(t, st, state)
	checkPlainRekeyed(t, disk, name, oldKey[:32], newKeyFile)
	if tb := sh(t, "dmsetup", "table", name); !strings.Contains(tb, "serpent-xts-plain64") {
		t.Fatalf("the rekeyed mapping is not serpent-xts-plain64: %s", tb)
	}
	// Cold: stock cryptsetup with the new key file and cipher.
	sh(t, "umount", mp)
	sh(t, "vgchange", "-an", vg)
	sh(t, "cryptsetup", "close", name)
	oldKeySeesNothing(t, disk, oldKeyFile)
	sh(t, "cryptsetup", "open", "--type", "plain", "--cipher", "serpent-xts-plain64", "--key-size", "256", "--key-file", newKeyFile, disk, name)
	sh(t, "vgchange", "-ay", vg)
	sh(t, "mount", lv, mp)
	verifyStack(t, st, state)

	// A second rekey, stopped half way and aborted: back on the first
	// run's key, every write there.
	j2 := st.file(state, "journal2")
	second := "/tmp/plv-second.key"
	w = startWriter(t, st, state)
	r = cliStart(t, "rekey", name, "--new-key-file", second, "--batch-mode", "--json", "--journal", j2, "--chunk-size", "1M")
	r.waitProgress(t, 0.5)
	r.cmd.Process.Signal(syscall.SIGTERM)
	code, errOut = r.wait()
	requireExit(t, "second plain rekey after SIGTERM", code, 5, errOut)
	acks, _ = w.finish(t)
	t.Logf("writer during the stopped run: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	w = startWriter(t, st, state)
	code, out = cliRun(t, "abort", "--journal", j2)
	requireExit(t, "abort of the second plain rekey", code, 0, out)
	t.Logf("abort:\n%s", out)
	acks, _ = w.finish(t)
	t.Logf("writer during the abort: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	sh(t, "umount", mp)
	sh(t, "vgchange", "-an", vg)
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--type", "plain", "--cipher", "serpent-xts-plain64", "--key-size", "256", "--key-file", newKeyFile, disk, name)
	sh(t, "vgchange", "-ay", vg)
	sh(t, "mount", lv, mp)
	verifyStack(t, st, state)
}

// plainLVMStack opens disk as a plain mapping <VG>_crypt (VG vg<tag>) of
// a new random 512-bit key, kept in state/<tag>-old.key, and builds a PV
// on it with an ext4 LV (mounted) and a raw LV.
func plainLVMStack(t testing.TB, tag, disk, state, extSize, rawSize string) *stack {
	t.Helper()
	vg := "vg" + tag
	name := vg + "_crypt"
	keyFile := filepath.Join(state, tag+"-old.key")
	randomKeyFile(t, keyFile, 64)
	syncDir(t, state)
	plainOpen(t, disk, name, keyFile, "512")
	m := "/dev/mapper/" + name
	sh(t, "pvcreate", "-y", m)
	sh(t, "vgcreate", "-y", vg, m)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", extSize, vg)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", rawSize, vg)
	return extRawStack(t, tag, disk, state, vg, 0, "-E", "lazy_itable_init=0,lazy_journal_init=0")
}

// TestGuestRekeyPlainToLUKS2: an ext4 on a plain mapping becomes LUKS2
// with a detached header under a writer; stopped with SIGTERM, stock
// cryptsetup refuses the half-made header; resumed (the passphrase opens
// the new header); checked live, after a cold open by stock cryptsetup
// with --header and the passphrase, and the old key shows nothing.
func TestGuestRekeyPlainToLUKS2(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	disk := d[9]
	tag := "pl2"
	name := tag + "-crypt"
	oldKeyFile, hdr := "/tmp/pl2-old.key", "/tmp/pl2.hdr"
	randomKeyFile(t, oldKeyFile, 64)
	// With cryptsetup's performance flags: the converted mapping keeps them.
	plainOpen(t, disk, name, oldKeyFile, "512", "--perf-same_cpu_crypt", "--perf-no_read_workqueue")
	dev := "/dev/mapper/" + name
	st := fsStack(t, tag, disk, state, name, "-E", "lazy_itable_init=0,lazy_journal_init=0")
	mp := st.Mounts[0]
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	r := cliStart(t, "rekey", name, "--type", "luks2", "--header", hdr, "--key-file", pwFile, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--batch-mode", "--json", "--journal", j, "--chunk-size", "1M")
	r.waitProgress(t, 0.4)
	r.cmd.Process.Signal(syscall.SIGTERM)
	code, errOut := r.wait()
	requireExit(t, "plain to LUKS2 after SIGTERM", code, 5, errOut)
	if out, err := shOK("cryptsetup", "open", "--header", hdr, "--key-file", pwFile, disk, "pl2-early"); err == nil {
		shOK("cryptsetup", "close", "pl2-early")
		t.Fatalf("stock cryptsetup opened the volume with the half-made header:\n%s", out)
	} else if !strings.Contains(out, "requirement") {
		t.Fatalf("stock cryptsetup refused the half-made header, but not for its requirement:\n%s", out)
	}
	code, out := cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the plain to LUKS2 conversion", code, 0, out)
	if !strings.Contains(out, "luks,header="+hdr) {
		t.Fatalf("resume printed no crypttab line:\n%s", out)
	}
	acks, gap := w.finish(t)
	t.Logf("writer: %d acknowledged writes, longest gap %v", acks, gap)
	if tb := sh(t, "dmsetup", "table", name); !strings.Contains(tb, "same_cpu_crypt") || !strings.Contains(tb, "no_read_workqueue") {
		t.Fatalf("the converted mapping lost its dm-crypt flags: %s", tb)
	}
	verifyStack(t, st, state)
	dump := sh(t, "cryptsetup", "luksDump", hdr)
	if !strings.Contains(dump, "offset: 0 [bytes]") || strings.Contains(dump, "dmconvert") {
		t.Fatalf("the detached header is not a finished one with its data at offset 0:\n%s", dump)
	}
	// Cold: stock cryptsetup opens it with the header and the passphrase.
	sh(t, "umount", mp)
	sh(t, "cryptsetup", "close", name)
	oldKeySeesNothing(t, disk, oldKeyFile)
	sh(t, "cryptsetup", "open", "--header", hdr, "--key-file", pwFile, disk, name)
	sh(t, "mount", dev, mp)
	verifyStack(t, st, state)
}

// TestGuestRekeyPlainToLUKS2OnDisk: an ext4 on a plain mapping opened with
// --offset (1 MiB before the data, unused) becomes LUKS2 with its header
// on the disk under a writer; killed with SIGKILL mid-run (nothing is
// written before the data yet: blkid sees no header), resumed; then the
// disk is LUKS2, stock cryptsetup opens it with the passphrase (no
// --header), and the old key shows nothing.
func TestGuestRekeyPlainToLUKS2OnDisk(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	disk := d[13]
	tag := "pl2d"
	name := tag + "-crypt"
	oldKeyFile := "/tmp/pl2d-old.key"
	randomKeyFile(t, oldKeyFile, 64)
	sh(t, "dd", "if=/dev/zero", "of="+disk, "bs=1M", "count=1", "oflag=direct", "status=none")
	plainOpen(t, disk, name, oldKeyFile, "512", "--offset", "2048")
	dev := "/dev/mapper/" + name
	st := fsStack(t, tag, disk, state, name, "-E", "lazy_itable_init=0,lazy_journal_init=0")
	mp := st.Mounts[0]
	j := st.file(state, "journal")
	code, out := cliRun(t, "rekey", name, "--type", "luks2", "--key-file", pwFile, "--dry-run", "--journal", j)
	requireExit(t, "dry run", code, 0, out)
	if !strings.Contains(out, "before the data") {
		t.Fatalf("the dry run does not say where the header goes:\n%s", out)
	}
	w := startWriter(t, st, state)
	r := cliStart(t, "rekey", name, "--type", "luks2", "--key-file", pwFile, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--batch-mode", "--json", "--journal", j, "--chunk-size", "1M")
	r.waitProgress(t, 0.4)
	r.cmd.Process.Kill()
	code, _ = r.wait()
	requireExit(t, "plain to LUKS2 after kill -9", code, 128+int(syscall.SIGKILL), "")
	if typ, _ := fsUUID(t, disk); typ != "" {
		t.Fatalf("blkid -p finds %q on %s mid-run", typ, disk)
	}
	code, out = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the plain to LUKS2 conversion", code, 0, out)
	if !strings.Contains(out, "cryptsetup open "+disk) {
		t.Fatalf("resume did not say how to open the volume:\n%s", out)
	}
	acks, gap := w.finish(t)
	t.Logf("writer: %d acknowledged writes, longest gap %v", acks, gap)
	verifyStack(t, st, state)
	dump := sh(t, "cryptsetup", "luksDump", disk)
	if !strings.Contains(dump, "offset: 1048576 [bytes]") || strings.Contains(dump, "dmconvert") {
		t.Fatalf("the disk's header is not a finished one with its data at 1 MiB:\n%s", dump)
	}
	// Cold: stock cryptsetup opens it with the passphrase alone.
	sh(t, "umount", mp)
	sh(t, "cryptsetup", "close", name)
	oldKeySeesNothing(t, disk, oldKeyFile, "--offset", "2048")
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	sh(t, "mount", dev, mp)
	verifyStack(t, st, state)
}

// TestGuestRekeyPlainKeyring: a plain mapping whose table names a kernel
// keyring key (":64:logon:...", as dmsetup or a keyring-using tool loads
// it), so that no program can read its key back: an ext4 mounted on it is
// rekeyed under a writer. Without the old key the rekey is refused; a
// wrong passphrase (--hash) is refused, checked against the live mapping,
// with the disk unchanged; a dry run of the disk with the right
// passphrase passes the check beside key checks killed plans left (it
// removes the one whose process is gone); the run, given the old key with
// --old-key-file, is killed with SIGKILL mid-run and resumed; checked
// live and after a cold open with the new key file.
func TestGuestRekeyPlainKeyring(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	disk := d[17]
	tag := "pkr"
	name := tag + "-crypt"
	oldKeyFile, newKeyFile := "/tmp/pkr-old.key", "/tmp/pkr-new.key"
	pass := "pkr old passphrase"
	// The key cryptsetup's plain mode makes from the passphrase (its
	// default hash), into the user keyring as a logon key.
	shIn(t, []byte(pass+"\n"), "cryptsetup", "open", "--type", "plain", "--cipher", "aes-xts-plain64", "--key-size", "512", disk, tag+"-tmp")
	oldKey := tableKey(t, tag+"-tmp")
	sh(t, "cryptsetup", "close", tag+"-tmp")
	writeFileSync(t, oldKeyFile, oldKey)
	if _, err := unix.AddKey("logon", "dmconvert:"+tag, oldKey, unix.KEY_SPEC_USER_KEYRING); err != nil {
		t.Fatalf("add_key logon dmconvert:%s: %v", tag, err)
	}
	sectors := diskSectors(t, disk)
	sh(t, "dmsetup", "create", name, "--uuid", "CRYPT-PLAIN-"+name, "--table",
		fmt.Sprintf("0 %d crypt aes-xts-plain64 :64:logon:dmconvert:%s 0 %s 0", sectors, tag, disk))
	if tb := sh(t, "dmsetup", "table", "--showkeys", name); !strings.Contains(tb, ":64:logon:dmconvert:"+tag) {
		t.Fatalf("the mapping's table does not name the keyring key: %s", tb)
	}
	dev := "/dev/mapper/" + name
	st := fsStack(t, tag, disk, state, name, "-E", "lazy_itable_init=0,lazy_journal_init=0")
	mp := st.Mounts[0]
	j := st.file(state, "journal")
	sh(t, "sync")
	sh(t, "umount", mp) // a quiet disk, to check that a refusal writes nothing
	refusedNaming(t, disk, name, 2, "kernel keyring", "rekey", name, "--new-key-file", newKeyFile, "--batch-mode", "--journal", j)
	before := diskBytes(t, disk)
	code, out := cliRunIn(t, nil, []byte("not the passphrase\n"), "rekey", name, "--hash", luks.DefaultPlainHash, "--new-key-file", newKeyFile, "--batch-mode", "--journal", j)
	if code != 3 || !strings.Contains(out, "is not its key") || !strings.Contains(out, name) {
		t.Fatalf("rekey with a wrong old passphrase: exit %d (want 3)\n%s", code, out)
	}
	// Key checks (crypt mappings of the disk) left by killed plans: one
	// whose process is gone, one of a live process (this one). The dry
	// run, given the disk, takes neither for the user's mapping and
	// removes the first.
	stale := map[string]int{"dmconvert-0bad-pid2147483647-keycheck": 2147483647, "dmconvert-0600d-pid" + strconv.Itoa(os.Getpid()) + "-keycheck": os.Getpid()}
	for n := range stale {
		sh(t, "dmsetup", "create", n, "--uuid", "DMCONVERT-"+strings.TrimPrefix(n, "dmconvert-"), "--table",
			fmt.Sprintf("0 %d crypt aes-xts-plain64 %x 0 %s 0", sectors, oldKey, disk))
	}
	code, out = cliRunIn(t, nil, []byte(pass+"\n"), "rekey", disk, "--hash", luks.DefaultPlainHash, "--dry-run", "--new-key-file", newKeyFile, "--journal", j)
	requireExit(t, "dry run with the right old passphrase, beside left-over key checks", code, 0, out)
	for n, pid := range stale {
		_, err := shOK("dmsetup", "info", n)
		if alive := pid == os.Getpid(); (err == nil) != alive {
			t.Fatalf("left-over key check %s: still there %v, want %v", n, err == nil, alive)
		}
	}
	sh(t, "dmsetup", "remove", "dmconvert-0600d-pid"+strconv.Itoa(os.Getpid())+"-keycheck")
	if !bytes.Equal(before, diskBytes(t, disk)) {
		t.Fatal("a refused rekey or the dry run changed the disk")
	}
	for _, p := range []string{j, newKeyFile} {
		if _, err := os.Stat(p); err == nil {
			t.Fatalf("a refused rekey or the dry run created %s", p)
		}
	}
	sh(t, "mount", dev, mp)
	w := startWriter(t, st, state)
	killedAt(t, 0.3, "plain rekey", "rekey", name, "--old-key-file", oldKeyFile, "--new-key-file", newKeyFile, "--batch-mode", "--json", "--journal", j, "--chunk-size", "1M")
	code, out = cliRun(t, "resume", "--journal", j, "--old-key-file", oldKeyFile)
	requireExit(t, "resume of the keyring plain rekey", code, 0, out)
	acks, gap := w.finish(t)
	t.Logf("writer: %d acknowledged writes, longest gap %v", acks, gap)
	verifyStack(t, st, state)
	checkPlainRekeyed(t, disk, name, oldKey, newKeyFile)
	shOK("umount", mp)
	sh(t, "dmsetup", "remove", name)
	oldKeySeesNothing(t, disk, oldKeyFile)
	plainOpen(t, disk, name, newKeyFile, "512")
	sh(t, "mount", dev, mp)
	verifyStack(t, st, state)
}
