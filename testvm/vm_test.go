package testvm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Host side: the guest tests of this package, rerun inside the VM.
func TestVM(t *testing.T) {
	RequireVM(t) // before BuildStatic, which would build for nothing
	RunTestsInGuest(t, Options{
		Disks: []Disk{{Size: 256 << 20}, {Size: 64 << 20}, {Size: 16 << 20, BlockSize: 4096}},
		Files: map[string]string{"bin/testvm": BuildStatic(t, "./testvm/cmd/testvm")},
		Env:   map[string]string{"TESTVM_PROBE": "it's \"quoted\" $HOME"},
	})
}

// TestVMPowerCut exercises the low-level API across two boots: data made
// durable before a marker survives a SIGKILL of QEMU (a power cut) right
// after the marker, and the next boot's exit status reaches the host.
func TestVMPowerCut(t *testing.T) {
	RequireVM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	if err := CreateDisk(disk, 64<<20); err != nil {
		t.Fatal(err)
	}
	share := filepath.Join(dir, "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	vm, err := Start(ctx, Config{
		Disks: []string{disk},
		Share: share,
		Script: `set -e
dd if=/dev/urandom of=/tmp/blob bs=1M count=4 status=none
sha256sum < /tmp/blob | cut -d' ' -f1 > written.sum
dd if=/tmp/blob of="${DMCONVERT_GUEST_DISKS%%,*}" bs=1M oflag=direct conv=fsync status=none
echo MARK-DURABLE
sleep 600
echo NOT-REACHED
`,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.WaitForConsole(ctx, "MARK-DURABLE"); err != nil {
		vm.Kill()
		res, _ := vm.Wait()
		t.Fatalf("%v\n%s", err, res.Report())
	}
	if err := vm.Kill(); err != nil {
		t.Fatal(err)
	}
	res, err := vm.Wait()
	if err != nil {
		t.Fatalf("wait after kill: %v", err)
	}
	if !res.Killed || res.ExitCode != -1 {
		t.Fatalf("after Kill: Killed=%v ExitCode=%d, want true, -1", res.Killed, res.ExitCode)
	}
	if bytes.Contains(res.Console, []byte("NOT-REACHED")) {
		t.Fatal("the guest went on after the kill")
	}
	t.Logf("first boot: ready after %.2fs, killed after %.2fs", res.Boot.Seconds(), res.Elapsed.Seconds())
	sum, err := os.ReadFile(filepath.Join(share, "written.sum"))
	if err != nil {
		t.Fatalf("the guest's result file did not come back through the share: %v", err)
	}
	want := strings.TrimSpace(string(sum))

	res, err = Run(ctx, Config{
		Disks:  []string{disk},
		Script: "dd if=\"$DMCONVERT_GUEST_DISKS\" bs=1M count=4 status=none | sha256sum | cut -d' ' -f1 | sed 's/^/READ-BACK=/'\nexit 3\n",
	})
	if err != nil {
		t.Fatalf("second boot: %v", err)
	}
	if res.ExitCode != 3 {
		t.Errorf("second boot: exit status %d, want 3\n%s", res.ExitCode, res.Report())
	}
	m := regexp.MustCompile(`READ-BACK=([0-9a-f]{64})`).FindSubmatch(res.Console)
	if m == nil || string(m[1]) != want {
		t.Fatalf("after the power cut the disk holds %q, want %s\n%s", m, want, res.Report())
	}
	if len(res.Dmesg) == 0 {
		t.Error("second boot: no guest dmesg came back")
	}
	t.Logf("second boot: %s, ready after %.2fs, total %.2fs; data written before the cut read back intact", res.GuestKernel, res.Boot.Seconds(), res.Elapsed.Seconds())
}

// TestVMTimeout: a guest that does not finish is killed at the timeout
// and reported as ErrTimeout.
func TestVMTimeout(t *testing.T) {
	RequireVM(t)
	start := time.Now()
	res, err := Run(context.Background(), Config{Script: "sleep 600", Timeout: 3 * time.Second})
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("err = %v, want ErrTimeout", err)
	}
	if el := time.Since(start); el > 30*time.Second {
		t.Errorf("timeout of 3s took %v", el)
	}
	if !strings.Contains(res.CommandLine, "tcg") || res.Killed {
		t.Errorf("result: command line %q, killed %v", res.CommandLine, res.Killed)
	}
}

// ---- guest tests (run inside the VM by TestVM) ----

// TestGuestHarness proves the guest is a usable real-kernel lab: an LVM
// VG with an LV carrying a mounted ext4 on the first disk, a dm-crypt
// mapping made with dmsetup on the second; data written, read back after
// dropping caches (and remounting / remapping) and compared by sha256.
func TestGuestHarness(t *testing.T) {
	RequireGuest(t)
	disks := GuestDisks()
	if len(disks) < 2 {
		t.Fatalf("GuestDisks() = %v, want 2 disks", disks)
	}

	// LVM: VG, LV, ext4, mounted, data round trip.
	sh(t, "pvcreate", "-q", disks[0])
	sh(t, "vgcreate", "-q", "hvg", disks[0])
	sh(t, "lvcreate", "-q", "-y", "-L", "128M", "-n", "hlv", "hvg")
	if tbl := sh(t, "dmsetup", "table", "hvg-hlv"); !strings.Contains(tbl, " linear ") {
		t.Fatalf("hvg-hlv table %q is not linear", tbl)
	}
	if lvs := sh(t, "lvs", "--noheadings", "-o", "lv_name,lv_size", "--units", "m", "hvg"); !strings.Contains(lvs, "hlv") || !strings.Contains(lvs, "128.00m") {
		t.Fatalf("lvs: %q", lvs)
	}
	sh(t, "mkfs.ext4", "-q", "/dev/hvg/hlv")
	mnt := t.TempDir()
	sh(t, "mount", "/dev/hvg/hlv", mnt)
	data := randomBytes(t, 8<<20)
	want := sha256.Sum256(data)
	writeSync(t, filepath.Join(mnt, "data"), data, 0)
	sh(t, "umount", mnt)
	dropCaches(t)
	sh(t, "mount", "/dev/hvg/hlv", mnt)
	if got := fileSum(t, filepath.Join(mnt, "data"), 0, len(data)); got != want {
		t.Fatalf("ext4 on LVM: read back %x, wrote %x", got, want)
	}
	// the coreutils tool agrees with Go
	if out := sh(t, "sha256sum", filepath.Join(mnt, "data")); !strings.HasPrefix(out, hex.EncodeToString(want[:])) {
		t.Fatalf("sha256sum says %q, want %x", out, want)
	}
	if out := sh(t, "findmnt", "-n", "-o", "FSTYPE", mnt); strings.TrimSpace(out) != "ext4" {
		t.Fatalf("findmnt: %q", out)
	}
	sh(t, "umount", mnt)
	sh(t, "e2fsck", "-f", "-n", "/dev/hvg/hlv")
	sh(t, "vgchange", "-q", "-an", "hvg")

	// dm-crypt with dmsetup: plaintext through the mapping, ciphertext below.
	key := hex.EncodeToString(randomBytes(t, 64))
	sectors := strings.TrimSpace(sh(t, "blockdev", "--getsz", disks[1]))
	table := fmt.Sprintf("0 %s crypt aes-xts-plain64 %s 0 %s 0", sectors, key, disks[1])
	sh(t, "dmsetup", "create", "hcrypt", "--table", table)
	plain := randomBytes(t, 4<<20)
	wantP := sha256.Sum256(plain)
	const off = 1 << 20
	writeSync(t, "/dev/mapper/hcrypt", plain, off)
	sh(t, "dmsetup", "remove", "hcrypt")
	dropCaches(t)
	if got := fileSum(t, disks[1], off, len(plain)); got == wantP {
		t.Fatal("the disk under dm-crypt holds the plaintext")
	}
	sh(t, "dmsetup", "create", "hcrypt", "--table", table)
	if got := fileSum(t, "/dev/mapper/hcrypt", off, len(plain)); got != wantP {
		t.Fatalf("dm-crypt: read back %x, wrote %x", got, wantP)
	}
	if st := sh(t, "dmsetup", "status", "hcrypt"); !strings.Contains(st, " crypt") {
		t.Fatalf("dmsetup status: %q", st)
	}
	sh(t, "dmsetup", "remove", "hcrypt")
}

// TestGuestBlockSizes: Disk.BlockSize reaches the guest's kernel, and a
// 4Kn disk keeps its place in the device order.
func TestGuestBlockSizes(t *testing.T) {
	RequireGuest(t)
	disks := GuestDisks()
	if len(disks) != 3 {
		t.Fatalf("GuestDisks() = %v, want 3 disks", disks)
	}
	for i, want := range []string{"512", "512", "4096"} {
		for _, q := range []string{"logical_block_size", "physical_block_size"} {
			b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(disks[i]), "queue", q))
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.TrimSpace(string(b)); got != want {
				t.Errorf("%s: %s %s, want %s", disks[i], q, got, want)
			}
		}
	}
	if got := strings.TrimSpace(sh(t, "blockdev", "--getsize64", disks[2])); got != strconv.Itoa(16<<20) {
		t.Errorf("%s: %s bytes, want the 16 MiB disk", disks[2], got)
	}
}

// TestGuestEnvironment checks what doc.go promises about the guest.
func TestGuestEnvironment(t *testing.T) {
	RequireGuest(t)
	if os.Getenv("DM_DISABLE_UDEV") != "1" {
		t.Error("DM_DISABLE_UDEV is not 1")
	}
	if got, want := os.Getenv("TESTVM_PROBE"), `it's "quoted" $HOME`; got != want {
		t.Errorf("Options.Env did not arrive intact: %q, want %q", got, want)
	}
	if os.Getuid() != 0 {
		t.Errorf("uid %d, want root", os.Getuid())
	}
	wd, _ := os.Getwd()
	if wd != GuestShare {
		t.Errorf("working directory %s, want %s", wd, GuestShare)
	}
	// disks in order, with the sizes the host asked for
	for i, want := range []int64{256 << 20, 64 << 20} {
		d := GuestDisks()[i]
		if got := strings.TrimSpace(sh(t, "blockdev", "--getsize64", d)); got != strconv.FormatInt(want, 10) {
			t.Errorf("%s: %s bytes, want %d", d, got, want)
		}
	}
	// /tmp is writable
	if err := os.WriteFile(filepath.Join(os.TempDir(), "probe"), []byte("x"), 0o600); err != nil {
		t.Error(err)
	}
	for _, tool := range [][]string{
		{"bash", "--version"}, {"dmsetup", "version"}, {"lvm", "version"}, {"cryptsetup", "--version"},
		{"mkfs.ext4", "-V"}, {"e2fsck", "-V"}, {"resize2fs"}, {"tune2fs"}, {"dumpe2fs", "-V"}, {"debugfs", "-V"},
		{"mkfs.xfs", "-V"}, {"xfs_repair", "-V"}, {"xfs_db", "-V"}, {"xfs_growfs", "-V"}, {"xfs_io", "-V"},
		{"blkid", "-V"}, {"wipefs", "-V"}, {"blockdev", "-V"}, {"losetup", "-V"}, {"findmnt", "-V"}, {"lsblk", "-V"},
		{"sfdisk", "-v"}, {"dd", "--version"}, {"date", "+%s.%N"}, {"sha256sum", "--version"}, {"truncate", "--version"},
		{"stat", "--version"}, {"sync", "--version"}, {"timeout", "--version"}, {"tcplay", "-v"}, {"script", "--version"},
		{"pvs", "--version"}, {"vgcreate", "--version"}, {"lvcreate", "--version"}, {"busybox"},
	} {
		cmd := exec.Command(tool[0], tool[1:]...)
		out, err := cmd.CombinedOutput()
		// resize2fs/tune2fs without arguments print usage and exit 1; tcplay -v exits 1 too.
		if err != nil && cmd.ProcessState == nil {
			t.Errorf("%s: %v", tool[0], err)
			continue
		}
		if cmd.ProcessState.ExitCode() > 1 || strings.Contains(string(out), "error while loading shared libraries") {
			t.Errorf("%s: exit %d: %s", strings.Join(tool, " "), cmd.ProcessState.ExitCode(), out)
		}
	}
	// coreutils date, not the busybox applet (which prints a literal %N)
	if out := sh(t, "date", "+%N"); strings.Contains(out, "N") {
		t.Errorf("date +%%N = %q: busybox date instead of coreutils", out)
	}
	targets := sh(t, "dmsetup", "targets")
	for _, tg := range []string{"linear", "striped", "crypt", "mirror", "flakey", "log-writes", "delay", "zero", "snapshot", "error"} {
		if !regexp.MustCompile(`(?m)^` + tg + `\s`).MatchString(targets) {
			t.Errorf("dm target %s not available:\n%s", tg, targets)
		}
	}
	for k, want := range map[string]string{
		"devices/use_devicesfile": "0", "devices/obtain_device_list_from_udev": "0", "activation/udev_sync": "0",
		"activation/udev_rules": "0", "activation/verify_udev_operations": "0", "backup/backup": "0", "backup/archive": "0",
	} {
		out := sh(t, "lvmconfig", k)
		if strings.TrimSpace(out) != strings.Split(k, "/")[1]+"="+want {
			t.Errorf("lvmconfig %s = %q, want %s", k, strings.TrimSpace(out), want)
		}
	}
	if out := sh(t, "lvmconfig", "devices/hints"); !strings.Contains(out, `"none"`) {
		t.Errorf("lvmconfig devices/hints = %q", out)
	}
	if m, _ := os.ReadFile("/proc/mounts"); !bytes.Contains(m, []byte(" "+GuestShare+" 9p ")) {
		t.Errorf("the share is not a 9p mount at %s:\n%s", GuestShare, m)
	}
}

// TestGuestOnDemandModules: modules not loaded at boot come in when the
// kernel asks for them (xfs on mount, dm-raid and an md personality for a
// "raid" table, serpent for a serpent cipher).
func TestGuestOnDemandModules(t *testing.T) {
	RequireGuest(t)
	dir := t.TempDir()
	var loops []string
	for i := 0; i < 2; i++ {
		img := filepath.Join(dir, fmt.Sprintf("l%d.img", i))
		sh(t, "truncate", "-s", "320M", img)
		loops = append(loops, strings.TrimSpace(sh(t, "losetup", "-f", "--show", img)))
	}
	defer func() {
		for _, l := range loops {
			exec.Command("losetup", "-d", l).Run()
		}
	}()

	sh(t, "mkfs.xfs", "-q", loops[0])
	mnt := t.TempDir()
	sh(t, "mount", loops[0], mnt)
	writeSync(t, filepath.Join(mnt, "f"), []byte("xfs works"), 0)
	sh(t, "umount", mnt)
	sh(t, "xfs_repair", "-n", loops[0])

	// raid1 over the two loop devices (no metadata devices), 64 MiB
	sh(t, "dmsetup", "create", "hraid", "--table", "0 131072 raid raid1 1 0 2 - "+loops[0]+" - "+loops[1])
	if st := sh(t, "dmsetup", "status", "hraid"); !strings.Contains(st, "raid raid1 2") {
		t.Errorf("raid1 status: %q", st)
	}
	sh(t, "dmsetup", "remove", "hraid")

	key := hex.EncodeToString(randomBytes(t, 64))
	sh(t, "dmsetup", "create", "hserpent", "--table", "0 8192 crypt serpent-xts-plain64 "+key+" 0 "+loops[1]+" 0")
	sh(t, "dmsetup", "remove", "hserpent")

	// lvm execs /sbin/modprobe itself for a missing target
	sh(t, "/sbin/modprobe", "dm-thin-pool")

	mods, _ := os.ReadFile("/proc/modules")
	for _, m := range []string{"xfs", "dm_raid", "raid1", "serpent", "dm_thin_pool"} {
		if !regexp.MustCompile(`(?m)^` + m + `\w*\s`).Match(mods) {
			t.Errorf("module %s not loaded", m)
		}
	}
}

// TestGuestCryptsetup: cryptsetup formats, opens and closes a LUKS2
// volume (its threads need libgcc_s, which ldd does not list).
func TestGuestCryptsetup(t *testing.T) {
	RequireGuest(t)
	dir := t.TempDir()
	img, kf := filepath.Join(dir, "luks.img"), filepath.Join(dir, "key")
	sh(t, "truncate", "-s", "32M", img)
	if err := os.WriteFile(kf, randomBytes(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	loop := strings.TrimSpace(sh(t, "losetup", "-f", "--show", img))
	defer exec.Command("losetup", "-d", loop).Run()
	sh(t, "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", kf, loop)
	sh(t, "cryptsetup", "open", "--key-file", kf, loop, "hluks")
	data := randomBytes(t, 1<<20)
	writeSync(t, "/dev/mapper/hluks", data, 0)
	sh(t, "cryptsetup", "close", "hluks")
	dropCaches(t)
	sh(t, "cryptsetup", "open", "--key-file", kf, loop, "hluks")
	if got := fileSum(t, "/dev/mapper/hluks", 0, len(data)); got != sha256.Sum256(data) {
		t.Fatal("data read back through the reopened LUKS2 mapping differs")
	}
	if st := sh(t, "cryptsetup", "status", "hluks"); !strings.Contains(st, "LUKS2") {
		t.Errorf("cryptsetup status: %s", st)
	}
	sh(t, "cryptsetup", "close", "hluks")
}

// TestGuestFiles runs a static binary passed in with Options.Files and
// built with BuildStatic.
func TestGuestFiles(t *testing.T) {
	RequireGuest(t)
	p := GuestFile("bin/testvm")
	if p != GuestFilesDir+"/bin/testvm" {
		t.Errorf("GuestFile = %q", p)
	}
	out, err := exec.Command(p, "help").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "testvm prepare") {
		t.Fatalf("%s help: %v\n%s", p, err, out)
	}
}

// ---- guest helpers ----

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func writeSync(t *testing.T, path string, data []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func fileSum(t *testing.T, path string, off int64, n int) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, off, int64(n))); err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

func dropCaches(t *testing.T) {
	t.Helper()
	sh(t, "sync")
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200); err != nil {
		t.Fatal(err)
	}
}
