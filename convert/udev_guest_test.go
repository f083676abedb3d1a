package convert

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

// Real-kernel tests with udev running, as on a Debian system: every other
// guest test runs without udevd (libdevmapper and dmconvert make the
// /dev/mapper nodes themselves). Here systemd-udevd runs with the rules
// Debian ships for block and device-mapper devices (testvm's
// guestUdevRules), LVM is configured as Debian configures it (udev_sync,
// udev_rules, the device list from udev, event activation: udev runs
// pvscan and vgchange -aay as PVs appear), and DM_DISABLE_UDEV is unset: so
// dmconvert, dmsetup, lvm and cryptsetup all wait for udev's cookies, udev
// makes the /dev/mapper links, and it probes every disk closed after a
// write (its inotify watch) while dmconvert works.

// vmUdev (TestVMUdev) boots one VM for these tests.
func vmUdev(t *testing.T) {
	vmParallel(t)
	bin := testvm.BuildStatic(t, "./cmd/dmconvert")
	testvm.RunTestsInGuest(t, testvm.Options{
		// d[0] holds the journals and manifests.
		Disks: []testvm.Disk{{Size: 96 * guestMiB}, {Size: 96 * guestMiB}, {Size: 64 * guestMiB}},
		// make test runs TestGuestUdevLVM; TestOptInGuestUdevFS (a file
		// system on the mapping: rekey, header-gap decrypt) runs with
		// DMCONVERT_VM_RUN='^Test(OptIn)?GuestUdev' (the suite's time).
		Run:     "^TestGuestUdev",
		Files:   map[string]string{"dmconvert": bin},
		Timeout: 15 * time.Minute,
	})
}

// startUdev starts systemd-udevd, replays the add events of the block
// devices already there (coldplug, as a boot does), and switches this
// process's environment (inherited by dmconvert and every tool the test
// runs) to udev: DM_DISABLE_UDEV unset, LVM's udev settings on. Cleanup
// stops udevd and restores the environment.
func startUdev(t testing.TB) {
	t.Helper()
	if _, err := os.Stat("/run/udev/control"); err == nil {
		if os.Getenv("DM_DISABLE_UDEV") == "" && os.Getenv("LVM_SYSTEM_DIR") != "" {
			return // the whole guest runs with udev (testvm.EnvVMUdev)
		}
		t.Fatal("udevd is already running")
	}
	sh(t, "bash", "-c", "set -e\n"+testvm.UdevPrelude)
	if _, err := os.Stat("/run/udev/control"); err != nil {
		t.Fatalf("systemd-udevd runs, but: %v", err)
	}
	if b, err := os.ReadFile(testvm.UdevLVMDir + "/lvm.conf"); err != nil || !strings.Contains(string(b), "udev_sync = 1") || !strings.Contains(string(b), "event_activation = 1") {
		t.Fatalf("%s/lvm.conf does not turn udev on (%v)", testvm.UdevLVMDir, err)
	}
	oldDisable, hadDisable := os.LookupEnv("DM_DISABLE_UDEV")
	os.Unsetenv("DM_DISABLE_UDEV")
	os.Setenv("LVM_SYSTEM_DIR", testvm.UdevLVMDir)
	t.Cleanup(func() {
		shOK("udevadm", "settle", "--timeout=60")
		shOK("udevadm", "control", "--exit")
		os.Remove("/run/udev/control")
		os.Unsetenv("LVM_SYSTEM_DIR")
		if hadDisable {
			os.Setenv("DM_DISABLE_UDEV", oldDisable)
		}
	})
	// udev made the links of the disks (60-persistent-storage.rules):
	// the rules run.
	if ents, _ := os.ReadDir("/dev/disk/by-path"); len(ents) == 0 {
		t.Fatalf("udev made no /dev/disk/by-path links after the coldplug; rules in the guest: %v", udevRulesIn())
	}
}

func udevRulesIn() []string {
	ents, _ := os.ReadDir("/usr/lib/udev/rules.d")
	var n []string
	for _, e := range ents {
		n = append(n, e.Name())
	}
	return n
}

// requireUdevConsistent: once udev has settled, no device-mapper cookie
// is left waiting (a leaked one would hang the next libdevmapper user
// for its timeout), every device-mapper device has its /dev/mapper link
// and every /dev/mapper entry names a live device with the right number.
func requireUdevConsistent(t testing.TB, when string) {
	t.Helper()
	sh(t, "udevadm", "settle", "--timeout=120")
	out := sh(t, "dmsetup", "udevcookies")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) > 1 {
		t.Fatalf("%s: device-mapper udev cookies left:\n%s", when, out)
	}
	info := sh(t, "dmsetup", "info", "-c", "--noheadings", "--separator", " ", "-o", "name,major,minor")
	live := map[string]bool{}
	for _, l := range strings.Split(strings.TrimSpace(info), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 {
			continue // "No devices found"
		}
		live[f[0]] = true
		p := "/dev/mapper/" + f[0]
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatalf("%s: %s (%s:%s) has no node: %v", when, f[0], f[1], f[2], err)
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok || fi.Mode()&os.ModeDevice == 0 || fmt.Sprintf("%d:%d", unixMajor(st.Rdev), unixMinor(st.Rdev)) != f[1]+":"+f[2] {
			t.Fatalf("%s: %s leads to %v, not to %s:%s", when, p, fi.Mode(), f[1], f[2])
		}
		if l, err := os.Lstat(p); err == nil && l.Mode()&os.ModeSymlink == 0 {
			// udev makes links; a node means dmconvert (or a tool) made it
			// behind udev's back.
			t.Fatalf("%s: %s is a device node, not udev's link", when, p)
		}
	}
	ents, _ := os.ReadDir("/dev/mapper")
	for _, e := range ents {
		if e.Name() != "control" && !live[e.Name()] {
			t.Fatalf("%s: /dev/mapper/%s is left with no device behind it", when, e.Name())
		}
	}
}

// requireHelpersPrivate checks that udev left a run's helper devices
// alone: their uevents carried the flags that skip the disk and other
// rules (as cryptsetup's temporary devices do), so nothing probed them
// (no file system type in udev's database, no /dev/disk links, no LVM
// scan). Before, an old key's view of a PV showed udev a second copy of
// the PV label. It returns how many helpers it saw.
func requireHelpersPrivate(t testing.TB, when string) int {
	t.Helper()
	sh(t, "udevadm", "settle", "--timeout=120")
	n := 0
	ents, _ := os.ReadDir("/dev/mapper")
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "dmconvert-") {
			continue
		}
		n++
		props := sh(t, "udevadm", "info", "--query=property", "/dev/mapper/"+e.Name())
		for _, want := range []string{"DM_UDEV_DISABLE_DISK_RULES_FLAG=1", "DM_UDEV_DISABLE_OTHER_RULES_FLAG=1"} {
			if !strings.Contains(props, want+"\n") {
				t.Errorf("%s: udev's record of helper %s lacks %s:\n%s", when, e.Name(), want, props)
			}
		}
		if strings.Contains(props, "ID_FS_TYPE=") {
			t.Errorf("%s: udev probed helper %s:\n%s", when, e.Name(), props)
		}
	}
	return n
}

// remount mounts st's file systems that verifyStack left unmounted.
func remount(t testing.TB, st *stack) {
	t.Helper()
	for i, mp := range st.Mounts {
		if !isMounted(mp) {
			sh(t, "mount", "/dev/mapper/"+st.VG+"-"+st.FSLVs[i], mp)
		}
	}
}

// remountFS mounts the file system on the mapping name if verifyStack
// left it unmounted.
func remountFS(t testing.TB, st *stack, name string) {
	t.Helper()
	if !isMounted(st.Mounts[0]) {
		sh(t, "mount", "/dev/mapper/"+name, st.Mounts[0])
	}
}

func unixMajor(dev uint64) uint64 { return (dev >> 8) & 0xfff }
func unixMinor(dev uint64) uint64 { return (dev & 0xff) | ((dev >> 12) & 0xfff00) }

// TestGuestUdevLVM: with udev running, a PV with live LVs (an ext4 with a
// writer, a raw LV) is encrypted (kill -9 mid-run, resume), rekeyed
// (SIGTERM mid-run, resume) and decrypted (SIGINT mid-run, resume); after
// each step udev's view is consistent and every acknowledged write is
// there, live and after a cold open.
func TestGuestUdevLVM(t *testing.T) {
	testvm.RequireGuest(t)
	startUdev(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[0])
	writePW(t)
	st := buildLightSized(t, "udv", d[1], state, "40m", "8m")
	requireUdevConsistent(t, "after the set-up")
	name := filepath.Base(st.Disk) + "_crypt"
	j := st.file(state, "journal")

	w := startWriter(t, st, state)
	killedAt(t, 0.4, "encrypt", encryptArgs(st, state)...)
	if requireHelpersPrivate(t, "after the kill mid-encrypt") == 0 {
		t.Errorf("no helper device after the kill mid-encrypt")
	}
	code, out := cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the encrypt", code, 0, out)
	requireUdevConsistent(t, "after the encrypt")
	// crypttab's UUID= finds the new LUKS header through udev's link.
	luksUUID := strings.TrimSpace(sh(t, "cryptsetup", "luksUUID", st.Disk))
	if link, err := filepath.EvalSymlinks("/dev/disk/by-uuid/" + luksUUID); err != nil || link != st.Disk {
		t.Fatalf("/dev/disk/by-uuid/%s leads to %q (%v), want %s", luksUUID, link, err, st.Disk)
	}
	if _, err := os.Stat("/dev/disk/by-id/dm-name-" + name); err != nil {
		t.Fatalf("udev made no by-id link for %s: %v", name, err)
	}
	acks, _ := w.finish(t)
	t.Logf("encrypt: %d acknowledged writes", acks)
	verifyEncryptedCold(t, st, state, name)
	requireUdevConsistent(t, "after the cold open")
	os.Remove(j)

	remount(t, st)
	w = startWriter(t, st, state)
	rekeyStopped(t, name, j, 0.4, "4M")
	if requireHelpersPrivate(t, "after the stop mid-rekey") == 0 {
		t.Errorf("no helper device after the stop mid-rekey")
	}
	code, out = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the rekey", code, 0, out)
	requireUdevConsistent(t, "after the rekey")
	acks, _ = w.finish(t)
	t.Logf("rekey: %d acknowledged writes", acks)
	verifyEncryptedCold(t, st, state, name)
	os.Remove(j)

	remount(t, st)
	decryptInterruptResume(t, st, state, name)
	requireUdevConsistent(t, "after the decrypt")
	if typ, _ := shOK("udevadm", "info", "--query=property", "--property=ID_FS_TYPE", "--value", st.Disk); strings.TrimSpace(typ) != "LVM2_member" {
		t.Fatalf("udev's database says %s holds %q, want LVM2_member (stale after the decrypt)", st.Disk, strings.TrimSpace(typ))
	}
}

// TestOptInGuestUdevFS: with udev running, an ext4 mounted directly on a LUKS2
// mapping is rekeyed (kill -9 mid-run, resume) and then decrypted through
// the header area (SIGTERM mid-run, resume); udev's view stays
// consistent, and after the decrypt udev finds the file system on the
// raw disk (the /dev/disk/by-uuid link a boot's fstab entry uses).
func TestOptInGuestUdevFS(t *testing.T) {
	testvm.RequireGuest(t)
	startUdev(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[0])
	writePW(t)
	st, name := fsOnMapping(t, "udvfs", d[2], state)
	_, uuid := fsUUID(t, "/dev/mapper/"+name)
	requireUdevConsistent(t, "after the set-up")
	j := st.file(state, "journal")

	w := startWriter(t, st, state)
	killedAt(t, 0.4, "rekey", "rekey", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "1M")
	code, out := cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the rekey", code, 0, out)
	requireUdevConsistent(t, "after the rekey")
	os.Remove(j)
	// The data moved toward the start by the gap (1 MiB): the mapping
	// grows by it, as cryptsetup maps the segment.
	acks, _ := w.finish(t)
	t.Logf("rekey: %d acknowledged writes", acks)
	if got := blockDevBytes(t, "/dev/mapper/"+name); got != st.Sizes[0]+1<<20 {
		t.Fatalf("the rekeyed mapping is %d bytes, want %d", got, st.Sizes[0]+1<<20)
	}
	st.Sizes[0] += 1 << 20
	verifyStack(t, st, state)
	// A reboot: stock cryptsetup opens it.
	shOK("umount", st.Mounts[0])
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, name)
	requireUdevConsistent(t, "after the cold open")
	verifyStack(t, st, state)
	remountFS(t, st, name)
	w = startWriter(t, st, state)

	r := cliStart(t, "decrypt", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "4M")
	r.waitProgress(t, 0.4)
	r.cmd.Process.Signal(syscall.SIGTERM)
	code, errOut := r.wait()
	requireExit(t, "decrypt after SIGTERM", code, 5, errOut)
	code, out = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the decrypt", code, 0, out)
	requireUdevConsistent(t, "after the decrypt")
	acks, _ = w.finish(t)
	t.Logf("decrypt: %d acknowledged writes", acks)
	verifyDecryptedFS(t, st, state, name, uuid)
	// A boot's fstab line (UUID=...) is found through udev's link.
	sh(t, "udevadm", "settle", "--timeout=120")
	link, err := filepath.EvalSymlinks("/dev/disk/by-uuid/" + uuid)
	if err != nil || link != st.Disk {
		out, _ := exec.Command("ls", "-l", "/dev/disk/by-uuid").CombinedOutput()
		t.Fatalf("/dev/disk/by-uuid/%s leads to %q (%v), want %s:\n%s", uuid, link, err, st.Disk, out)
	}
}
