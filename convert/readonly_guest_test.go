package convert

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/dmconvert/dmconvert/testvm"
)

// requireReadOnly: the device is read-only (want) or writable, as the
// kernel sees it: its disk's read-only flag (blockdev --getro) and the
// device-mapper state. (Opening it for writing succeeds either way on
// this kernel.)
func requireReadOnly(t testing.TB, when, dev string, want bool) {
	t.Helper()
	ro := strings.TrimSpace(sh(t, "blockdev", "--getro", dev)) == "1"
	info := sh(t, "dmsetup", "info", dev)
	dmRO := strings.Contains(info, "(READ-ONLY)")
	if ro != want || dmRO != want {
		t.Fatalf("%s: %s read-only %v (blockdev --getro), device-mapper says:\n%s\nwant read-only %v", when, dev, ro, info, want)
	}
}

// TestGuestRekeyReadOnly: devices their administrator made read-only stay
// read-only through every run, and writable ones writable: an ext4
// mounted read-only on a LUKS2 mapping opened with cryptsetup open
// --readonly (rekey stopped by SIGINT, checked while its devices are
// restacked, resumed; then decrypt), and an LV of permission r beside a
// writable LV on a PV (encrypt killed by kill -9 and resumed, rekey,
// decrypt), their bytes unchanged. Before 2026-11-25 every run made them
// writable: the kernel gives a device the mode of the table that goes
// live, and the runs' reloads were read-write.
func TestGuestRekeyReadOnly(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	disk, pvDisk := d[19], d[20]

	// A read-only mapping with a read-only ext4 on it.
	name := "rofs-crypt"
	sh(t, "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pwFile, disk)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	mapping := "/dev/mapper/" + name
	sh(t, "mkfs.ext4", "-q", "-F", mapping)
	mp := "/mnt/rofs"
	os.MkdirAll(mp, 0o755)
	sh(t, "mount", mapping, mp)
	content := []byte(strings.Repeat("read-only data\n", 20000))
	if err := os.WriteFile(filepath.Join(mp, "f"), content, 0o644); err != nil {
		t.Fatal(err)
	}
	sh(t, "umount", mp)
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--readonly", "--key-file", pwFile, disk, name)
	sh(t, "mount", "-o", "ro", mapping, mp)
	requireReadOnly(t, "before the rekey", mapping, true)
	checkFile := func(when string) {
		t.Helper()
		if b, err := os.ReadFile(filepath.Join(mp, "f")); err != nil || string(b) != string(content) {
			t.Fatalf("%s: the file on the read-only mapping differs (%v)", when, err)
		}
	}
	j := filepath.Join(state, "rofs-journal")
	r := cliStart(t, "rekey", mapping, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "1M")
	r.waitProgress(t, 0.3)
	r.cmd.Process.Signal(syscall.SIGINT)
	code, out := r.wait()
	requireExit(t, "rekey after SIGINT", code, 5, out)
	requireReadOnly(t, "the rekey stopped mid-way (restacked)", mapping, true)
	code, out = cliRun(t, resumeArgs(j)...)
	requireExit(t, "resume of the rekey", code, 0, out)
	requireReadOnly(t, "after the rekey", mapping, true)
	checkFile("after the rekey")
	code, out = cliRun(t, "decrypt", mapping, "--batch-mode", "--key-file", pwFile, "--journal", filepath.Join(state, "rofs-journal2"), "--chunk-size", "1M")
	requireExit(t, "decrypt", code, 0, out)
	requireReadOnly(t, "after the decrypt", mapping, true)
	checkFile("after the decrypt")
	sh(t, "umount", mp)
	sh(t, "dmsetup", "remove", name)

	// A read-only LV beside a writable one.
	vg := "vgro"
	sh(t, "pvcreate", "-q", "-y", pvDisk)
	sh(t, "vgcreate", "-q", vg, pvDisk)
	sh(t, "lvcreate", "-q", "-y", "-L", "8M", "-n", "rw", vg)
	sh(t, "lvcreate", "-q", "-y", "-L", "8M", "-n", "ro", vg)
	rw, ro := "/dev/mapper/"+vg+"-rw", "/dev/mapper/"+vg+"-ro"
	for _, lv := range []string{rw, ro} {
		sh(t, "dd", "if=/dev/urandom", "of="+lv, "bs=1M", "count=8", "oflag=direct", "status=none")
	}
	sh(t, "lvchange", "-q", "-p", "r", vg+"/ro")
	rwBytes, roBytes := diskBytes(t, rw), diskBytes(t, ro)
	check := func(when string) {
		t.Helper()
		requireReadOnly(t, when, ro, true)
		requireReadOnly(t, when, rw, false)
		mustEqual(t, when+": the read-only LV", roBytes, diskBytes(t, ro))
		mustEqual(t, when+": the writable LV", rwBytes, diskBytes(t, rw))
	}
	check("before the encrypt")
	j = filepath.Join(state, "rolv-journal")
	r = cliStart(t, append([]string{"encrypt", pvDisk, "--shrink-pv", "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "1M"}, cheapKDFFlags...)...)
	r.waitProgress(t, 0.3)
	r.cmd.Process.Kill()
	code, _ = r.wait()
	requireExit(t, "encrypt after kill -9", code, 128+int(syscall.SIGKILL), "")
	check("the encrypt killed mid-way")
	code, out = cliRun(t, resumeArgs(j)...)
	requireExit(t, "resume of the encrypt", code, 0, out)
	check("after the encrypt")
	pvMapping := "/dev/mapper/" + filepath.Base(pvDisk) + "_crypt"
	requireReadOnly(t, "after the encrypt", pvMapping, false)
	code, out = cliRun(t, "rekey", pvMapping, "--batch-mode", "--key-file", pwFile, "--journal", filepath.Join(state, "rolv-journal2"), "--chunk-size", "1M")
	requireExit(t, "rekey of the PV", code, 0, out)
	check("after the rekey")
	code, out = cliRun(t, "decrypt", pvMapping, "--batch-mode", "--key-file", pwFile, "--journal", filepath.Join(state, "rolv-journal3"), "--chunk-size", "1M")
	requireExit(t, "decrypt of the PV", code, 0, out)
	check("after the decrypt")
	if attr := sh(t, "lvs", "--noheadings", "-o", "lv_attr", vg+"/ro"); !strings.HasPrefix(strings.TrimSpace(attr), "-r") {
		t.Fatalf("LVM no longer shows %s/ro read-only: %q", vg, attr)
	}
}
