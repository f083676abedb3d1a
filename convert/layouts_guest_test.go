package convert

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

// Real-kernel tests of `dmconvert encrypt` on disk layouts other than a
// whole disk holding one PV with linear LVs: a PV on a GPT partition, a
// VG spanning two PVs of which one is converted, LVs of several segments
// with striped and raid1 LVs, an old-style snapshot and a thin pool, a PV
// whose data area does not start at 1 MiB, a PV with a metadata area at
// its end. Each runs the dmconvert command under a writer and checks
// every file and acknowledged record live and after a cold open with
// stock cryptsetup and vgchange.

// The disks of TestVMLayouts, in order (/dev/vda ...).
const (
	layPartDisk    = iota // GPT: the PV is partition 2 of 3
	layTwoPVA             // converted PV of a two-PV VG
	layTwoPVB             // the other PV
	laySegDisk            // several segments, striped and raid1 legs
	laySegOther           // the other stripe and raid1 leg
	laySnapDisk           // snapshot and thin pool
	layPEStartDisk        // pe_start at 8 MiB, LUKS1
	layTailMDADisk        // second metadata area at the end of the PV
	layRestartA           // converted PV of the restart test
	layRestartB           // its other PV
	layFPDisk             // snapshot and thin pool, crash in the restack
	lay4KnDisk            // 4096-byte logical sectors
	layCacheDisk          // a cached LV, a writecache LV and a swap LV
	layMDA                // md RAID1: the leg that stays
	layMDB                // md RAID1: the leg that fails and is rebuilt
	layStateDisk          // journals, acknowledgements, the loop device's file
)

// vmLayouts (TestVMLayouts) boots one VM for the layout tests.
func vmLayouts(t *testing.T) {
	vmParallel(t)
	bin := testvm.BuildStatic(t, "./cmd/dmconvert")
	files := map[string]string{"dmconvert": bin}
	if testvm.VMRequested() && !testvm.InGuest() {
		// dmconvert that dies at a named failpoint (DMCONVERT_FAILPOINT)
		fp := filepath.Join(t.TempDir(), "dmconvert-fp")
		cmd := exec.Command("go", "build", "-tags", "failpoints", "-o", fp, "../cmd/dmconvert")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building dmconvert with failpoints: %v\n%s", err, out)
		}
		files["dmconvert-fp"] = fp
	}
	testvm.RunTestsInGuest(t, testvm.Options{
		Disks: []testvm.Disk{
			{Size: 256 * guestMiB},                        // vda
			{Size: 160 * guestMiB}, {Size: 96 * guestMiB}, // vdb, vdc
			{Size: 192 * guestMiB}, {Size: 96 * guestMiB}, // vdd, vde
			{Size: 256 * guestMiB},                       // vdf
			{Size: 96 * guestMiB}, {Size: 96 * guestMiB}, // vdg, vdh
			{Size: 160 * guestMiB}, {Size: 96 * guestMiB}, // vdi, vdj
			{Size: 160 * guestMiB},                       // vdk
			{Size: 128 * guestMiB, BlockSize: 4096},      // vdl: 4Kn (encrypt, rekey, decrypt: 192 MiB cost a minute more)
			{Size: 128 * guestMiB},                       // vdm: cache and swap
			{Size: 96 * guestMiB}, {Size: 96 * guestMiB}, // vdn, vdo: md RAID1
			{Size: 448 * guestMiB}, // vdp: state (the inactive VG's loop file: 160 MiB)
		},
		// make test runs the TestGuestLayout* tests; the TestOptIn ones
		// (kill and restart, a crash mid-restack, tail metadata) run with
		// DMCONVERT_VM_RUN='^Test(OptIn)?GuestLayout' (the suite's time
		// budget).
		Run:     "^TestGuestLayout",
		Files:   files,
		Timeout: 30 * time.Minute,
	})
}

// lvmNoThinCheck is passed to every lvm command of these tests: the guest
// has no thin_check or cache_check, without which lvm refuses to activate
// a thin pool or a cached LV.
const lvmNoThinCheck = `global { thin_check_executable="" cache_check_executable="" }`

// lv runs an lvm command with lvmNoThinCheck.
func lv(t testing.TB, cmd string, args ...string) string {
	t.Helper()
	return sh(t, "lvm", append([]string{cmd, "--config", lvmNoThinCheck}, args...)...)
}

// TestGuestLayoutCacheSwap: a mounted LV cached in writeback mode by a
// cache volume on the same PV (dm-cache), an LV with a writecache
// (dm-writecache) holding random bytes, and an active swap LV; kill -9
// mid-run, resume. The cached LV has every write (live and after a cold
// open, the cache reassembled by vgchange), the writecache LV reads what
// was written, and the swap stays in use. Then decrypted (SIGINT,
// resume): the caches' sub-LVs and the others go back onto the raw disk,
// still in use.
func TestGuestLayoutCacheSwap(t *testing.T) {
	testvm.RequireGuest(t)
	layoutModules(t)
	d := testvm.GuestDisks()
	disk := d[layCacheDisk]
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	lv(t, "pvcreate", "-y", disk)
	lv(t, "vgcreate", "-y", "vgca", disk)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", "48m", "vgca")
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "fast", "-L", "16m", "vgca")
	lv(t, "lvconvert", "-y", "--type", "cache", "--cachevol", "vgca/fast", "--cachemode", "writeback", "vgca/ext")
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "8m", "vgca")
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "swap", "-L", "8m", "vgca")
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "wc", "-L", "4m", "vgca")
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "wcfast", "-L", "4m", "vgca")
	lv(t, "lvconvert", "-y", "--type", "writecache", "--cachevol", "vgca/wcfast", "vgca/wc")
	lv(t, "vgchange", "-ay", "vgca")
	wc := "/dev/mapper/vgca-wc"
	fillRandom(t, wc)
	wcBefore := diskBytes(t, wc)
	if tb := sh(t, "dmsetup", "table", "vgca-ext"); !strings.Contains(tb, " cache ") {
		t.Fatalf("vgca/ext is not a dm-cache device: %s", tb)
	}
	t.Logf("layout:\n%s", lv(t, "lvs", "-a", "-o", "lv_name,attr,lv_size,pool_lv,devices,segtype", "vgca"))
	swap := "/dev/mapper/vgca-swap"
	sh(t, "mkswap", swap)
	sh(t, "swapon", swap)
	st := newLayoutStack("ca", disk, "vgca")
	addExt4(t, st, "ext")
	writeManifest(t, st, state)

	w := startWriter(t, st, state)
	encryptInterrupted(t, st, state, syscall.SIGKILL, 0.45, "--shrink-pv", "--chunk-size", "2M")
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	name := filepath.Base(disk) + "_crypt"
	finalChecks(t, st, name)
	stillInUse := func(when string) {
		t.Helper()
		if swaps := sh(t, "cat", "/proc/swaps"); !strings.Contains(swaps, "vgca-swap") {
			t.Fatalf("the swap LV is no longer in use %s:\n%s", when, swaps)
		}
		if tb := sh(t, "dmsetup", "table", "vgca-ext"); !strings.Contains(tb, " cache ") || !strings.Contains(tb, "writeback") {
			t.Fatalf("vgca/ext lost its writeback cache %s: %s", when, tb)
		}
		if tb := sh(t, "dmsetup", "table", "vgca-wc"); !strings.Contains(tb, " writecache ") {
			t.Fatalf("vgca/wc lost its writecache %s: %s", when, tb)
		}
		mustEqual(t, "the writecache LV "+when, wcBefore, diskBytes(t, wc))
	}
	stillInUse("after the encrypt")
	verifyStack(t, st, state)
	sh(t, "swapoff", swap)
	coldVerifyLayout(t, st, state, name, []string{"ext", "raw", "wc"})
	mustEqual(t, "the writecache LV after the cold open", wcBefore, diskBytes(t, wc))

	// Decrypt (its journal is the encrypt's path: that run is done).
	sh(t, "swapon", swap)
	if err := os.Remove(st.file(state, "journal")); err != nil {
		t.Fatal(err)
	}
	out := decryptInterrupted(t, st, state, name)
	stillInUse("after the decrypt")
	sh(t, "swapoff", swap)
	verifyPlainCold(t, st, state, name)
	mustEqual(t, "the writecache LV after the decrypt's cold open", wcBefore, diskBytes(t, wc))
	growPVAsTold(t, st, out)
}

func lvOK(cmd string, args ...string) (string, error) {
	return shOK("lvm", append([]string{cmd, "--config", lvmNoThinCheck}, args...)...)
}

// layoutModules loads the dm targets lvm probes for with modprobe (the
// guest loads them on demand from the kernel, not from lvm's probe).
func layoutModules(t testing.TB) {
	for _, m := range []string{"dm-thin-pool", "dm-raid", "raid1", "dm-snapshot", "dm-cache", "dm-cache-smq", "dm-writecache"} {
		if out, err := shOK("modprobe", m); err != nil {
			t.Logf("modprobe %s: %v %s", m, err, out)
		}
	}
}

// newLayoutStack starts a stack description for VG vg on disk.
func newLayoutStack(tag, disk, vg string) *stack {
	return &stack{Tag: tag, Disk: disk, VG: vg, RawLV: "/dev/mapper/" + vg + "-raw"}
}

// extRawVG makes VG vg on the PV disk with an ext4 LV "ext" (mounted)
// and a raw LV "raw" of the given sizes, and writes the manifest.
func extRawVG(t testing.TB, tag, disk, vg, extSize, rawSize, state string) *stack {
	t.Helper()
	lv(t, "vgcreate", "-y", vg, disk)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", extSize, vg)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", rawSize, vg)
	lv(t, "vgchange", "-ay", vg)
	st := newLayoutStack(tag, disk, vg)
	addExt4(t, st, "ext")
	writeManifest(t, st, state)
	return st
}

// addExt4 makes an ext4 file system on LV name of st's VG, mounts it and
// adds it to st.
func addExt4(t testing.TB, st *stack, name string) {
	t.Helper()
	dev := "/dev/mapper/" + st.VG + "-" + name
	mp := "/mnt/" + st.Tag + "-" + name
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
	os.MkdirAll(mp, 0o755)
	sh(t, "mount", dev, mp)
	st.Mounts = append(st.Mounts, mp)
	st.FSLVs = append(st.FSLVs, name)
	st.FSTypes = append(st.FSTypes, "ext4")
	st.Sizes = append(st.Sizes, blockDevBytes(t, dev))
}

// shrunkPV makes a PV on dev that ends two LUKS2 header sizes (2*16 MiB)
// before the end of the device, with extra pvcreate flags.
func shrunkPV(t testing.TB, dev string, header uint64, flags ...string) {
	t.Helper()
	size := diskSectors(t, dev)
	a := append([]string{"-y", "--setphysicalvolumesize", fmt.Sprintf("%ds", size-2*header)}, flags...)
	lv(t, "pvcreate", append(a, dev)...)
}

// rangeBytes reads n bytes of dev at off, past any cache.
func rangeBytes(t testing.TB, dev string, off, n int64) []byte {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	raw := make([]byte, n+4096)
	a := 4096 - int(uintptrOfSlice(raw)%4096)
	buf := raw[a : a+int(n)]
	if _, err := f.ReadAt(buf, off); err != nil {
		t.Fatalf("reading %d bytes of %s at %d: %v", n, dev, off, err)
	}
	return append([]byte(nil), buf...)
}

// fillRandom writes random data over the whole device (and flushes it).
func fillRandom(t testing.TB, dev string) {
	t.Helper()
	out, _ := shOK("dd", "if=/dev/urandom", "of="+dev, "bs=1M", "oflag=direct", "status=none")
	_ = out // dd ends with "No space left on device" at the end of the device
	sh(t, "sync")
}

// mustEqual fails when a device's bytes differ from what they were.
func mustEqual(t testing.TB, what string, before, after []byte) {
	t.Helper()
	if !bytes.Equal(before, after) {
		t.Fatalf("%s changed (first difference at byte %d of %d)", what, firstDiff(before, after), len(before))
	}
}

// encryptInterrupted runs dmconvert encrypt on st.Disk, stops it with sig
// once frac of it is done (sig 0: no interruption), then resumes it.
func encryptInterrupted(t testing.TB, st *stack, state string, sig syscall.Signal, frac float64, extra ...string) {
	t.Helper()
	r := cliStart(t, encryptArgs(st, state, extra...)...)
	if sig == 0 {
		code, errOut := r.wait()
		requireExit(t, "encrypt", code, 0, errOut)
		return
	}
	r.waitProgress(t, frac)
	r.cmd.Process.Signal(sig)
	code, errOut := r.wait()
	want := 5
	if sig == syscall.SIGKILL {
		want = 128 + int(syscall.SIGKILL)
	}
	requireExit(t, fmt.Sprintf("encrypt after %v", sig), code, want, errOut)
	code, out := cliRun(t, "resume", "--journal", st.file(state, "journal"), "--key-file", pwFile, "--json")
	requireExit(t, "resume", code, 0, out)
}

// coldVerifyLayout is verifyEncryptedCold for VGs that may have other PVs
// and thin pools: everything closed, the raw disk is LUKS and activates
// none of the stack's LVs, stock cryptsetup opens it, vgchange -ay, then
// every check.
func coldVerifyLayout(t testing.TB, st *stack, state, name string, lvs []string) {
	t.Helper()
	for _, mp := range st.Mounts {
		shOK("umount", mp)
	}
	lv(t, "vgchange", "-an", st.VG)
	sh(t, "dmsetup", "remove", name)
	if typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", st.Disk); strings.TrimSpace(typ) != "crypto_LUKS" {
		t.Fatalf("blkid -p %s says %q, want crypto_LUKS", st.Disk, typ)
	}
	out, _ := lvOK("vgchange", "-ay", st.VG)
	for _, l := range lvs {
		if info, err := shOK("dmsetup", "info", st.VG+"-"+l); err == nil {
			t.Fatalf("LVM activated %s/%s without the encrypted PV (vgchange said %s):\n%s", st.VG, l, out, info)
		}
	}
	lvOK("vgchange", "-an", st.VG)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, name)
	lv(t, "vgchange", "-ay", st.VG)
	verifyStack(t, st, state)
}

// finalChecks: the final mapping is a crypt mapping of the disk and LVM
// sees the PV on it.
func finalChecks(t testing.TB, st *stack, name string) {
	t.Helper()
	tb := sh(t, "dmsetup", "table", name)
	if !strings.Contains(tb, " crypt ") {
		t.Fatalf("final table of %s: %s", name, tb)
	}
	pvs := lv(t, "pvs", "--noheadings", "-o", "pv_name,vg_name")
	if !strings.Contains(pvs, "/dev/mapper/"+name) {
		t.Fatalf("LVM does not see the PV on %s: %s", name, pvs)
	}
	deps := sh(t, "dmsetup", "deps", "-o", "devname", name)
	if !strings.Contains(deps, "("+filepath.Base(st.Disk)+")") {
		t.Fatalf("%s does not map %s: %s", name, st.Disk, deps)
	}
}

// TestGuestLayoutPartition: the PV is the middle partition of a GPT
// disk, of an odd size (192 MiB and 7 sectors); the partition before it
// holds an ext4 that stays mounted and written to throughout (as /boot
// does beside an LVM partition), the one after it other data. Only the
// partition is encrypted; the last partition and the partition tables are
// byte for byte what they were, the mounted file system keeps its files.
// SIGINT mid-run, then resume.
func TestGuestLayoutPartition(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	disk := d[layPartDisk]
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	// Partition 2 is 192 MiB and 7 sectors: not a whole number of MiB,
	// extents or chunks.
	sh(t, "sh", "-c", "printf 'label: gpt\\n,16M\\n,393223\\n,\\n' | sfdisk -q "+disk)
	p1, pv, p3 := disk+"1", disk+"2", disk+"3"
	for i := 0; i < 50; i++ {
		if _, err := os.Stat(p3); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	fillRandom(t, p3)
	// A /boot beside the PV: mounted, written to during the run.
	sh(t, "mkfs.ext4", "-q", "-F", p1)
	boot := "/mnt/part-boot"
	os.MkdirAll(boot, 0o755)
	sh(t, "mount", p1, boot)
	t.Cleanup(func() { shOK("umount", boot) })
	sh(t, "dd", "if=/dev/urandom", "of="+boot+"/before", "bs=1M", "count=4", "conv=fsync", "status=none")
	bootSums := func() string {
		return sh(t, "sh", "-c", "cd "+boot+" && sha256sum before during")
	}
	// PV on the whole partition: --shrink-pv makes the room.
	lv(t, "pvcreate", "-y", pv)
	lv(t, "vgcreate", "-y", "vgpart", pv)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", "64m", "vgpart")
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "16m", "vgpart")
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext2", "-L", "48m", "vgpart")
	lv(t, "vgchange", "-ay", "vgpart")
	st := newLayoutStack("part", pv, "vgpart")
	addExt4(t, st, "ext")
	addExt4(t, st, "ext2")
	writeManifest(t, st, state)

	size := int64(blockDevBytes(t, disk))
	p3Before := diskBytes(t, p3)
	headBefore := rangeBytes(t, disk, 0, 1<<20)
	tailBefore := rangeBytes(t, disk, size-1<<20, 1<<20)
	tableBefore := sh(t, "sfdisk", "-d", disk)

	w := startWriter(t, st, state)
	// Written to /boot while the run starts.
	bootWrite := exec.Command("dd", "if=/dev/urandom", "of="+boot+"/during", "bs=64k", "count=64", "oflag=sync", "status=none")
	if err := bootWrite.Start(); err != nil {
		t.Fatal(err)
	}
	encryptInterrupted(t, st, state, syscall.SIGINT, 0.3, "--shrink-pv", "--chunk-size", "2M")
	if err := bootWrite.Wait(); err != nil {
		t.Fatalf("writing to the file system on %s during the run: %v", p1, err)
	}
	sums := bootSums()
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	name := filepath.Base(pv) + "_crypt"
	finalChecks(t, st, name)
	verifyStack(t, st, state)
	check := func(when string) {
		if got := bootSums(); got != sums {
			t.Fatalf("the files of the file system on %s %s:\n%s\nwere:\n%s", p1, when, got, sums)
		}
		mustEqual(t, "partition 3 "+when, p3Before, diskBytes(t, p3))
		mustEqual(t, "the disk's first MiB (protective MBR, GPT) "+when, headBefore, rangeBytes(t, disk, 0, 1<<20))
		mustEqual(t, "the disk's last MiB (backup GPT) "+when, tailBefore, rangeBytes(t, disk, size-1<<20, 1<<20))
		if got := sh(t, "sfdisk", "-d", disk); got != tableBefore {
			t.Fatalf("partition table %s:\n%s\nwas:\n%s", when, got, tableBefore)
		}
		if typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "PTTYPE", disk); strings.TrimSpace(typ) != "gpt" {
			t.Fatalf("blkid -p %s: PTTYPE %q %s", disk, typ, when)
		}
	}
	check("after the conversion")
	coldVerifyLayout(t, st, state, name, []string{"ext", "ext2", "raw"})
	// The cold open: /boot too.
	sh(t, "umount", boot)
	sh(t, "fsck.ext4", "-n", "-f", p1)
	sh(t, "sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
	sh(t, "mount", p1, boot)
	check("after the cold open")
}

// TestGuestLayoutTwoPVs: VG of two PVs; an LV spans both (mounted, written
// to), a legacy mirror LV has a leg on each (mounted, written to), one LV
// lives only on the other PV. Only the first PV is converted, and it has
// no metadata area: the other stays a plain PV whose LV is byte for byte
// unchanged, and the spanning and mirrored LVs keep every write.
func TestGuestLayoutTwoPVs(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	a, b := d[layTwoPVA], d[layTwoPVB]
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	// The converted PV has no metadata area (the VG's metadata lives on
	// the other PV only).
	shrunkPV(t, a, 32768, "--metadatacopies", "0")
	lv(t, "pvcreate", "-y", b)
	lv(t, "vgcreate", "-y", "vgtwo", a, b)
	// span: 48 MiB on a, then 40 MiB on b.
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "span", "-L", "48m", "vgtwo", a)
	lv(t, "lvextend", "-y", "-L", "+40m", "vgtwo/span", b)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "16m", "vgtwo", a)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "onlya", "-L", "24m", "vgtwo", a)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "keep", "-L", "16m", "vgtwo", b)
	// A legacy mirror LV (dm-mirror, core log): one leg on each PV.
	lv(t, "lvcreate", "-y", "-an", "-Zn", "--type", "mirror", "-m1", "--mirrorlog", "core", "-n", "mir", "-L", "16m", "vgtwo", a, b)
	lv(t, "vgchange", "-ay", "vgtwo")
	segs := lv(t, "lvs", "--noheadings", "-o", "lv_name,devices", "vgtwo/span")
	if !strings.Contains(segs, a) || !strings.Contains(segs, b) {
		t.Fatalf("span is not on both PVs: %s", segs)
	}
	if mdas := lv(t, "pvs", "--noheadings", "-o", "pv_mda_count", a); strings.TrimSpace(mdas) != "0" {
		t.Fatalf("%s has %s metadata areas, want 0", a, mdas)
	}
	st := newLayoutStack("two", a, "vgtwo")
	addExt4(t, st, "span")
	addExt4(t, st, "onlya")
	addExt4(t, st, "mir")
	writeManifest(t, st, state)
	keep := "/dev/mapper/vgtwo-keep"
	fillRandom(t, keep)
	keepBefore := diskBytes(t, keep)
	bLabel := rangeBytes(t, b, 0, 4096)

	w := startWriter(t, st, state)
	encryptInterrupted(t, st, state, syscall.SIGTERM, 0.5, "--chunk-size", "2M")
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	name := filepath.Base(a) + "_crypt"
	finalChecks(t, st, name)
	pvs := lv(t, "pvs", "--noheadings", "-o", "pv_name,vg_name")
	if !strings.Contains(pvs, b) {
		t.Fatalf("LVM lost the other PV %s: %s", b, pvs)
	}
	for _, l := range []string{"span", "keep"} {
		deps := sh(t, "dmsetup", "deps", "-o", "devname", "vgtwo-"+l)
		if !strings.Contains(deps, "("+filepath.Base(b)+")") {
			t.Fatalf("vgtwo-%s no longer maps %s: %s", l, b, deps)
		}
	}
	verifyStack(t, st, state)
	mustEqual(t, "LV keep on the other PV", keepBefore, diskBytes(t, keep))
	if typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", b); strings.TrimSpace(typ) != "LVM2_member" {
		t.Fatalf("blkid -p %s says %q, want LVM2_member", b, typ)
	}
	mustEqual(t, "the other PV's label", bLabel, rangeBytes(t, b, 0, 4096))
	coldVerifyLayout(t, st, state, name, []string{"span", "raw", "onlya"})
	mustEqual(t, "LV keep on the other PV after the cold open", keepBefore, diskBytes(t, keep))
}

// TestGuestLayoutInactiveVG: a PV on a loop device (its file on the
// state disk's ext4) whose VG has no LV active (nothing above the disk
// to restack); SIGINT mid-run, resume. The VG then activates on the
// mapping with every file and the raw LV's bytes as they were, no helper
// device is left, and a cold open finds them too.
func TestGuestLayoutInactiveVG(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	img := filepath.Join(state, "inactive-vg.img")
	sh(t, "truncate", "-s", "160M", img)
	disk := strings.TrimSpace(sh(t, "losetup", "--find", "--show", img))
	t.Cleanup(func() { shOK("losetup", "-d", disk) })
	shrunkPV(t, disk, 32768)
	st := extRawVG(t, "ia", disk, "vgia", "96m", "16m", state)
	fillRandom(t, st.RawLV)
	rawBefore := diskBytes(t, st.RawLV)
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	lv(t, "vgchange", "-an", "vgia")
	encryptInterrupted(t, st, state, syscall.SIGINT, 0.5)
	if out, _ := shOK("dmsetup", "ls"); strings.Contains(out, "vgia-") || strings.Contains(out, "dmconvert-") {
		t.Fatalf("after the run, LVs of the inactive VG or helpers are active:\n%s", out)
	}
	name := filepath.Base(disk) + "_crypt"
	lv(t, "vgchange", "-ay", "vgia")
	finalChecks(t, st, name)
	mustEqual(t, "the raw LV", rawBefore, diskBytes(t, st.RawLV))
	verifyStack(t, st, state)
	coldVerifyLayout(t, st, state, name, []string{"ext", "raw"})
	mustEqual(t, "the raw LV after the cold open", rawBefore, diskBytes(t, st.RawLV))
}

// TestGuestLayoutSegments: LVs of several segments interleaved on the
// converted PV, a striped LV and a raid1 LV with one stripe/leg on it and
// the other on a second PV; every one mounted and written to; SIGINT,
// resume.
func TestGuestLayoutSegments(t *testing.T) {
	testvm.RequireGuest(t)
	layoutModules(t)
	d := testvm.GuestDisks()
	a, b := d[laySegDisk], d[laySegOther]
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	shrunkPV(t, a, 32768)
	lv(t, "pvcreate", "-y", b)
	lv(t, "vgcreate", "-y", "vgseg", a, b)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "seg", "-L", "16m", "vgseg", a)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "8m", "vgseg", a)
	lv(t, "lvextend", "-y", "-L", "+16m", "vgseg/seg", a)
	lv(t, "lvextend", "-y", "-L", "+4m", "vgseg/raw", a)
	lv(t, "lvextend", "-y", "-L", "+24m", "vgseg/seg", a)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "str", "-i", "2", "-I", "64k", "-L", "32m", "vgseg", a, b)
	lv(t, "vgchange", "-ay", "vgseg")
	lv(t, "lvcreate", "-y", "--type", "raid1", "-m", "1", "-n", "mir", "-L", "48m", "vgseg", a, b)
	for i := 0; ; i++ {
		out := strings.TrimSpace(lv(t, "lvs", "--noheadings", "-o", "sync_percent", "vgseg/mir"))
		if strings.HasPrefix(out, "100") {
			break
		}
		if i > 300 {
			t.Fatalf("raid1 LV did not sync: %s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("layout:\n%s", lv(t, "lvs", "-a", "--segments", "-o", "lv_name,segtype,seg_start_pe,seg_size_pe,devices", "vgseg"))
	if n := strings.Count(sh(t, "dmsetup", "table", "vgseg-seg"), "linear"); n < 3 {
		t.Fatalf("vgseg-seg has %d linear segments, want 3", n)
	}
	st := newLayoutStack("seg", a, "vgseg")
	addExt4(t, st, "seg")
	addExt4(t, st, "str")
	addExt4(t, st, "mir")
	writeManifest(t, st, state)
	w := startWriter(t, st, state)
	encryptInterrupted(t, st, state, syscall.SIGINT, 0.4, "--chunk-size", "2M")
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	name := filepath.Base(a) + "_crypt"
	finalChecks(t, st, name)
	if out := lv(t, "lvs", "--noheadings", "-o", "lv_health_status,sync_percent", "vgseg/mir"); strings.TrimSpace(out) != "100.00" {
		t.Logf("raid1 after the conversion: %q", out)
	}
	verifyStack(t, st, state)
	coldVerifyLayout(t, st, state, name, []string{"seg", "raw", "str"})
}

// snapThinStack builds VG "vg"+tag on a shrunk PV on disk: an ext4 LV
// "orig" (origSize) with an old-style snapshot "snap" (snapSize) taken
// after the manifest, a raw LV, and a thin pool (poolSize) with an ext4
// thin LV "thin" (thinSize).
func snapThinStack(t *testing.T, tag, disk, state, origSize, poolSize, thinSize, snapSize string) *stack {
	t.Helper()
	vg := "vg" + tag
	shrunkPV(t, disk, 32768)
	lv(t, "vgcreate", "-y", vg, disk)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "orig", "-L", origSize, vg)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "8m", vg)
	lv(t, "lvcreate", "-y", "--type", "thin-pool", "-n", "pool", "-L", poolSize, vg)
	lv(t, "lvcreate", "-y", "-n", "thin", "-V", thinSize, "--thinpool", vg+"/pool")
	lv(t, "vgchange", "-ay", vg)
	st := newLayoutStack(tag, disk, vg)
	addExt4(t, st, "orig")
	addExt4(t, st, "thin")
	writeManifest(t, st, state)
	lv(t, "lvcreate", "-y", "-s", "-n", "snap", "-L", snapSize, vg+"/orig")
	return st
}

// TestGuestLayoutSnapshotThin: an old-style snapshot of a mounted LV and
// a thin LV in a thin pool, mounted, all on the converted PV; kill -9
// mid-run, resume. The snapshot's content is what it was when taken, and
// the origin and thin LV have every write.
func TestGuestLayoutSnapshotThin(t *testing.T) {
	testvm.RequireGuest(t)
	layoutModules(t)
	d := testvm.GuestDisks()
	disk := d[laySnapDisk]
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	st := snapThinStack(t, "st", disk, state, "64m", "64m", "64m", "48m")
	snap := "/dev/mapper/vgst-snap"
	snapBefore := diskBytes(t, snap)
	t.Logf("layout:\n%s", lv(t, "lvs", "-a", "-o", "lv_name,attr,lv_size,origin,pool_lv,devices", "vgst"))

	w := startWriter(t, st, state)
	encryptInterrupted(t, st, state, syscall.SIGKILL, 0.45, "--chunk-size", "2M")
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	name := filepath.Base(disk) + "_crypt"
	finalChecks(t, st, name)
	if out := lv(t, "lvs", "--noheadings", "-o", "lv_attr", "vgst/snap"); !strings.HasPrefix(strings.TrimSpace(out), "s") || strings.Contains(out, "I") {
		t.Fatalf("snapshot attributes after the conversion: %q", out)
	}
	mustEqual(t, "the snapshot", snapBefore, diskBytes(t, snap))
	verifyStack(t, st, state)
	coldVerifyLayout(t, st, state, name, []string{"orig", "thin", "raw", "snap"})
	// Read with the origin's file systems unmounted: once (2026-11-22)
	// this O_DIRECT read of the snapshot, with the origin just mounted
	// again, never returned (no I/O in flight; cause not found; the
	// guest's hang monitor now reports such a wait).
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	mustEqual(t, "the snapshot after the cold open", snapBefore, diskBytes(t, snap))
}

// TestGuestLayoutPEStart: a PV whose data area starts at 8 MiB (4 MiB
// metadata area, 4 MiB alignment), converted to LUKS1 (a 2 MiB header,
// smaller than pe_start) with serpent-xts-plain64 (the keyslot in Serpent
// too); SIGINT, resume; then decrypted (SIGINT, resume). The PV is
// itself a device-mapper device, as a multipath map is: a linear map of
// the disk from its second MiB (so LVM finds the PV on the map only), and
// the messages name it by its /dev/mapper path.
func TestGuestLayoutPEStart(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	under := d[layPEStartDisk]
	sh(t, "dmsetup", "create", "mpath-pe", "--table", fmt.Sprintf("0 %d linear %s 2048", diskSectors(t, under)-2048, under))
	disk := "/dev/mapper/mpath-pe"
	shrunkPV(t, disk, 4096, "--dataalignment", "4m", "--metadatasize", "4m")
	pe := strings.TrimSpace(lv(t, "pvs", "--noheadings", "--units", "s", "--nosuffix", "-o", "pe_start", disk))
	if n, err := strconv.ParseUint(pe, 10, 64); err != nil || n <= 2048 {
		t.Fatalf("pe_start of %s is %q sectors, want more than the default 2048", disk, pe)
	}
	t.Logf("pe_start %s sectors", pe)
	st := extRawVG(t, "pe", disk, "vgpe", "40m", "8m", state)
	w := startWriter(t, st, state)
	args := []string{"encrypt", disk, "--batch-mode", "--json", "--key-file", pwFile, "--journal", st.file(state, "journal"),
		"--type", "luks1", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--chunk-size", "1M",
		// A Serpent LUKS1 volume: its keyslot in Serpent too (dmconvert's own).
		"--cipher", "serpent-xts-plain64"}
	r := cliStart(t, args...)
	r.waitProgress(t, 0.3)
	r.cmd.Process.Signal(syscall.SIGINT)
	code, errOut := r.wait()
	requireExit(t, "encrypt after SIGINT", code, 5, errOut)
	code, out := cliRun(t, "resume", "--journal", st.file(state, "journal"), "--key-file", pwFile)
	requireExit(t, "resume", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	name := filepath.Base(disk) + "_crypt"
	finalChecks(t, st, name)
	if s := sh(t, "cryptsetup", "status", name); !strings.Contains(s, "LUKS1") || !regexp.MustCompile(`cipher:\s+serpent-xts-plain64\n`).MatchString(s) {
		t.Fatalf("cryptsetup status %s:\n%s", name, s)
	}
	verifyStack(t, st, state)
	// A decrypt's plan finds the disk under the mapping: it names it
	// /dev/mapper/mpath-pe, not /dev/dm-N.
	out, err := shOK(dmconvertBin(t), "decrypt", name, "--dry-run", "--key-file", pwFile)
	if err != nil {
		t.Fatalf("decrypt --dry-run of %s: %v\n%s", name, err, out)
	}
	if !strings.Contains(out, disk) || strings.Contains(out, "/dev/dm-") {
		t.Fatalf("the decrypt's plan does not name the disk %s by that path:\n%s", disk, out)
	}
	coldVerifyLayout(t, st, state, name, []string{"ext", "raw"})
	// Decrypted again (SIGINT, resume): its output names the disk by its
	// /dev/mapper path in the pvresize it advises.
	os.Remove(st.file(state, "journal"))
	remount(t, st)
	out = decryptInterrupted(t, st, state, name)
	if strings.Contains(out, "/dev/dm-") {
		t.Fatalf("the decrypt names a /dev/dm-N path:\n%s", out)
	}
	verifyPlainCold(t, st, state, name)
	growPVAsTold(t, st, out)
}

// TestOptInGuestLayoutTailMetadata: a PV with a second metadata area at its
// end (--pvmetadatacopies 2) filling the disk; --shrink-pv moves that
// area to make room.
func TestOptInGuestLayoutTailMetadata(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	disk := d[layTailMDADisk]
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	lv(t, "pvcreate", "-y", "--pvmetadatacopies", "2", disk)
	lv(t, "vgcreate", "-y", "vgtm", disk)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", "40m", "vgtm")
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "8m", "vgtm")
	lv(t, "vgchange", "-ay", "vgtm")
	st := newLayoutStack("tm", disk, "vgtm")
	addExt4(t, st, "ext")
	writeManifest(t, st, state)
	w := startWriter(t, st, state)
	encryptInterrupted(t, st, state, 0, 0, "--shrink-pv", "--chunk-size", "2M")
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	name := filepath.Base(disk) + "_crypt"
	finalChecks(t, st, name)
	if n := strings.TrimSpace(lv(t, "pvs", "--noheadings", "-o", "pv_mda_count", "/dev/mapper/"+name)); n != "2" {
		t.Fatalf("the PV on %s has %s metadata areas, want 2", name, n)
	}
	verifyStack(t, st, state)
	coldVerifyLayout(t, st, state, name, []string{"ext", "raw"})
}

// TestOptInGuestLayoutTwoPVsRestart: a VG of two PVs with an LV spanning both;
// the conversion of one is killed (kill -9) half way, then everything is
// closed as at a power-off (LVs, the intermediate device, the helpers).
// Nothing activates the half-converted PV from the raw disk, and
// `dmconvert resume` rebuilds the stack, activates the VG on the
// intermediate device and the other PV, and finishes.
func TestOptInGuestLayoutTwoPVsRestart(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	a, b := d[layRestartA], d[layRestartB]
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	shrunkPV(t, a, 32768)
	lv(t, "pvcreate", "-y", b)
	lv(t, "vgcreate", "-y", "vgrs", a, b)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "span", "-L", "40m", "vgrs", a)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "16m", "vgrs", a)
	lv(t, "lvextend", "-y", "-L", "+40m", "vgrs/span", b)
	lv(t, "lvcreate", "-y", "-an", "-Zn", "-n", "onlyb", "-L", "16m", "vgrs", b)
	lv(t, "vgchange", "-ay", "vgrs")
	st := newLayoutStack("rs", a, "vgrs")
	addExt4(t, st, "span")
	writeManifest(t, st, state)
	onlyb := "/dev/mapper/vgrs-onlyb"
	fillRandom(t, onlyb)
	onlybBefore := diskBytes(t, onlyb)

	w := startWriter(t, st, state)
	r := cliStart(t, encryptArgs(st, state, "--chunk-size", "2M")...)
	r.waitProgress(t, 0.5)
	r.cmd.Process.Kill()
	code, _ := r.wait()
	requireExit(t, "encrypt after kill -9", code, 128+int(syscall.SIGKILL), "")
	// Power-off: nothing stays suspended, the writer stops, the file
	// systems are unmounted, every device of the VG and of the run goes.
	cutIfLeftSuspended(t, w)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes before the kill", acks)
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	name := filepath.Base(a) + "_crypt"
	for _, n := range strings.Fields(sh(t, "sh", "-c", "dmsetup ls | cut -f1")) {
		if strings.HasPrefix(n, "vgrs-") {
			sh(t, "dmsetup", "remove", n)
		}
	}
	sh(t, "dmsetup", "remove", name) // before the helpers it maps
	for _, n := range strings.Fields(sh(t, "sh", "-c", "dmsetup ls | cut -f1")) {
		if strings.HasPrefix(n, "dmconvert-") {
			sh(t, "dmsetup", "remove", n)
		}
	}
	// Boot-time tools: the half-converted PV is not used from the raw
	// disk, and stock cryptsetup refuses it.
	out, _ := lvOK("vgchange", "-ay", "vgrs")
	for _, l := range []string{"span", "raw"} {
		if info, err := shOK("dmsetup", "info", "vgrs-"+l); err == nil {
			t.Fatalf("LVM activated vgrs/%s from the half-converted disk (vgchange said %s):\n%s", l, out, info)
		}
	}
	lvOK("vgchange", "-an", "vgrs")
	if out, err := shOK("cryptsetup", "open", "--key-file", pwFile, a, "rs-probe"); err == nil {
		shOK("cryptsetup", "close", "rs-probe")
		t.Fatalf("stock cryptsetup opened the half-converted %s:\n%s", a, out)
	}
	code, out = cliRun(t, "resume", "--journal", st.file(state, "journal"), "--key-file", pwFile, "--json")
	requireExit(t, "resume after the restart", code, 0, out)
	finalChecks(t, st, name)
	for _, l := range []string{"span", "onlyb"} {
		deps := sh(t, "dmsetup", "deps", "-o", "devname", "vgrs-"+l)
		if !strings.Contains(deps, "("+filepath.Base(b)+")") {
			t.Fatalf("vgrs-%s does not map %s after the resume: %s", l, b, deps)
		}
	}
	verifyStack(t, st, state)
	mustEqual(t, "LV onlyb on the other PV", onlybBefore, diskBytes(t, onlyb))
	coldVerifyLayout(t, st, state, name, []string{"span", "raw"})
	mustEqual(t, "LV onlyb on the other PV after the cold open", onlybBefore, diskBytes(t, onlyb))
}

// TestOptInGuestLayoutSnapshotThinRestackCrash: dmconvert dies (no cleanup at
// all) with the thin pool's data sub-LV suspended in the middle of the
// restack, under a snapshot origin, a thin LV and a writer; resume must
// resume it and finish.
func TestOptInGuestLayoutSnapshotThinRestackCrash(t *testing.T) {
	testvm.RequireGuest(t)
	layoutModules(t)
	d := testvm.GuestDisks()
	disk := d[layFPDisk]
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	fpBin := testvm.GuestFile("dmconvert-fp")
	if fpBin == "" {
		t.Fatal("the failpoint build of dmconvert was not passed into the guest")
	}
	st := snapThinStack(t, "fp", disk, state, "40m", "40m", "48m", "24m")
	// The restack reloads, in name order, vgfp-orig-real, vgfp-pool_tdata,
	// ...: the second suspend is the thin pool's data.
	users := sh(t, "sh", "-c", "dmsetup ls | cut -f1 | grep '^vgfp-' | sort")
	t.Logf("devices: %s", strings.Join(strings.Fields(users), " "))

	w := startWriter(t, st, state)
	cmd := exec.Command(fpBin, encryptArgs(st, state, "--chunk-size", "2M")...)
	cmd.Env = append(os.Environ(), "DMCONVERT_FAILPOINT=suspend:after:2")
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != FailpointExitCode {
		w.finish(t)
		t.Fatalf("dmconvert with DMCONVERT_FAILPOINT=suspend:after:2: %v, want exit %d:\n%s", err, FailpointExitCode, out)
	}
	if a := strings.TrimSpace(sh(t, "dmsetup", "info", "-c", "--noheadings", "-o", "attr", "vgfp-pool_tdata")); !strings.Contains(a, "s") {
		info, _ := shOK("dmsetup", "info", "-c", "-o", "name,attr")
		t.Fatalf("the failpoint did not leave vgfp-pool_tdata suspended (attr %q):\n%s", a, info)
	}
	code, rout := cliRun(t, "resume", "--journal", st.file(state, "journal"), "--key-file", pwFile, "--json")
	requireExit(t, "resume", code, 0, rout)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	name := filepath.Base(disk) + "_crypt"
	finalChecks(t, st, name)
	verifyStack(t, st, state)
	coldVerifyLayout(t, st, state, name, []string{"orig", "thin", "raw", "snap"})
}

// TestGuestLayout4Kn: a disk with 4096-byte logical sectors (4Kn), a PV
// on it with a mounted ext4 LV and a raw LV. Each under a writer, each
// interrupted and resumed, each checked live and after a cold open:
// encrypt (its LUKS2 header gets 4096-byte sectors, as the disk's block
// size demands), rekey, decrypt.
func TestGuestLayout4Kn(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	disk := d[lay4KnDisk]
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	if ss := strings.TrimSpace(sh(t, "blockdev", "--getss", disk)); ss != "4096" {
		t.Fatalf("%s has %s-byte logical sectors, want a 4Kn disk", disk, ss)
	}
	lv(t, "pvcreate", "-y", disk)
	st := extRawVG(t, "4kn", disk, "vg4k", "64m", "16m", state)
	name := filepath.Base(disk) + "_crypt"

	// Encrypt.
	w := startWriter(t, st, state)
	encryptInterrupted(t, st, state, syscall.SIGINT, 0.4, "--shrink-pv", "--chunk-size", "2M")
	acks, _ := w.finish(t)
	t.Logf("encrypt: %d acknowledged writes", acks)
	finalChecks(t, st, name)
	verifyStack(t, st, state)
	if dump := sh(t, "cryptsetup", "luksDump", disk); !regexp.MustCompile(`(?m)^\s*sector:\s*4096 \[bytes\]`).MatchString(dump) {
		t.Fatalf("the LUKS2 header of the 4Kn disk does not have 4096-byte sectors:\n%s", dump)
	}
	coldVerifyLayout(t, st, state, name, []string{"ext", "raw"})

	// Rekey.
	oldKey := saveVolumeKey(t, disk, "/tmp/4kn-old.key")
	jr := st.file(state, "journal-rekey")
	w = startWriter(t, st, state)
	rekeyStopped(t, name, jr, 0.4, "4M")
	code, out := cliRun(t, "resume", "--journal", jr, "--key-file", pwFile)
	requireExit(t, "resume of the rekey", code, 0, out)
	acks, _ = w.finish(t)
	t.Logf("rekey: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	checkRekeyed(t, disk, oldKey, "/tmp/4kn-old.key")
	coldVerifyLayout(t, st, state, name, []string{"ext", "raw"})

	// Decrypt (its journal is the encrypt's path: that run is done).
	if err := os.Remove(st.file(state, "journal")); err != nil {
		t.Fatal(err)
	}
	decryptInterruptResume(t, st, state, name)
	if ss := strings.TrimSpace(sh(t, "blockdev", "--getss", "/dev/mapper/vg4k-ext")); ss != "4096" {
		t.Fatalf("the decrypted LV has %s-byte sectors", ss)
	}
}

// TestGuestLayoutMDRaid1: the PV is an md RAID1 array (mdadm, metadata
// 1.2, an internal bitmap) of two disks, as on many servers. Mid-encrypt
// one leg fails and is removed, then the run is killed (kill -9) and
// everything is torn down as by a reboot, after which the array comes
// back from the leg that stayed under another name (/dev/md127, as
// arrays without an mdadm.conf do). Resume refuses the recorded name,
// which no longer exists, and says to give --device; with it, it
// finishes while the failed leg, added back, is rebuilt. Afterwards every
// write is there, md's check finds the two legs identical, the array,
// stopped and assembled again from both legs, opens with stock
// cryptsetup; then it is decrypted (SIGINT, resume) back to a PV on the
// array.
func TestGuestLayoutMDRaid1(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[layStateDisk])
	writePW(t)
	legA, legB := d[layMDA], d[layMDB]
	disk := "/dev/md0"
	sh(t, "mdadm", "--create", disk, "--run", "--level=1", "--raid-devices=2", "--metadata=1.2",
		"--bitmap=internal", "--assume-clean", legA, legB)
	// The rebuild shares the disks with the run; md's floor of 1 MB/s
	// under other I/O would make it outlast the test.
	if err := os.WriteFile("/proc/sys/dev/raid/speed_limit_min", []byte("50000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	shrunkPV(t, disk, 32768)
	st := extRawVG(t, "md", disk, "vgmd", "32m", "8m", state)
	name := filepath.Base(disk) + "_crypt"
	j := st.file(state, "journal")

	w := startWriter(t, st, state)
	r := cliStart(t, encryptArgs(st, state, "--chunk-size", "2M")...)
	r.waitProgress(t, 0.25)
	sh(t, "mdadm", disk, "--fail", legB)
	sh(t, "mdadm", disk, "--remove", legB)
	if deg := mdAttr(t, disk, "degraded"); deg != "1" {
		t.Fatalf("%s with %s removed: degraded %q, want 1", disk, legB, deg)
	}
	r.waitProgress(t, 0.45)
	r.cmd.Process.Kill()
	code, errOut := r.wait()
	requireExit(t, "encrypt after kill -9", code, 128+int(syscall.SIGKILL), errOut)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)

	// A reboot: nothing mapped, the array assembled from the leg that
	// stayed, under another name.
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	removeDMDevices(t, func(n string) bool {
		return strings.HasPrefix(n, st.VG+"-") || strings.HasPrefix(n, "dmconvert-") || n == name
	})
	sh(t, "mdadm", "--stop", disk)
	disk = "/dev/md127"
	sh(t, "mdadm", "--assemble", "--run", disk, legA)
	st.Disk = disk
	lvOK("vgchange", "-ay", st.VG) // what a boot's activation does (nothing, once the header is there)
	code, out := cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	if code != 2 || !strings.Contains(out, "/dev/md0") || !strings.Contains(out, "--device") {
		t.Fatalf("resume with the array renamed: exit %d, want 2 naming /dev/md0 and --device:\n%s", code, out)
	}
	t.Logf("resume with the array renamed: exit 2: %s", strings.TrimSpace(out))
	r = cliStart(t, "resume", "--journal", j, "--key-file", pwFile, "--device", disk, "--json")
	r.waitProgress(t, 0.6)
	sh(t, "mdadm", disk, "--add", legB)
	t.Logf("%s with %s added back during the resume: %s", disk, legB, mdAttr(t, disk, "sync_action"))
	code, errOut = r.wait()
	requireExit(t, "resume with --device", code, 0, errOut)
	mdIdle(t, disk)
	if deg := mdAttr(t, disk, "degraded"); deg != "0" {
		t.Fatalf("%s after the rebuild: degraded %q, want 0", disk, deg)
	}
	lv(t, "vgchange", "-ay", st.VG)
	finalChecks(t, st, name)
	verifyStack(t, st, state)
	// Both legs hold the same bytes: every write of the run, and the
	// rebuild's copy of what was written while the leg was out.
	sh(t, "sync")
	if err := os.WriteFile(filepath.Join("/sys/block", filepath.Base(disk), "md", "sync_action"), []byte("check\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	mdIdle(t, disk)
	if mm := mdAttr(t, disk, "mismatch_cnt"); mm != "0" {
		t.Fatalf("md's check of %s: mismatch_cnt %s, want 0", disk, mm)
	}
	coldVerifyLayout(t, st, state, name, []string{"ext", "raw"})

	// As at a boot: the array stopped and assembled from both legs, then
	// opened by stock cryptsetup.
	for _, mp := range st.Mounts {
		shOK("umount", mp)
	}
	lv(t, "vgchange", "-an", st.VG)
	sh(t, "cryptsetup", "close", name)
	sh(t, "mdadm", "--stop", disk)
	sh(t, "mdadm", "--assemble", disk, legA, legB)
	if deg := mdAttr(t, disk, "degraded"); deg != "0" {
		t.Fatalf("%s assembled again: degraded %q, want 0", disk, deg)
	}
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	lv(t, "vgchange", "-ay", st.VG)
	remount(t, st)
	verifyStack(t, st, state)

	// Decrypted (SIGINT, resume): a PV on the array again.
	os.Remove(j)
	out = decryptInterrupted(t, st, state, name)
	verifyPlainCold(t, st, state, name)
	growPVAsTold(t, st, out)
}

// removeDMDevices removes the device-mapper devices whose names match,
// those on top first (as a shutdown leaves nothing mapped).
func removeDMDevices(t testing.TB, match func(string) bool) {
	t.Helper()
	for pass := 0; ; pass++ {
		var left []string
		for _, l := range strings.Split(sh(t, "dmsetup", "ls"), "\n") {
			if f := strings.Fields(l); len(f) > 0 && match(f[0]) {
				left = append(left, f[0])
			}
		}
		if len(left) == 0 {
			return
		}
		if pass == 10 {
			t.Fatalf("cannot remove %v", left)
		}
		for _, n := range left {
			shOK("dmsetup", "remove", n) // busy while a device above it exists
		}
	}
}

// mdAttr reads /sys/block/<md>/md/<attr>.
func mdAttr(t testing.TB, md, attr string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(md), "md", attr))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// mdIdle waits (up to 5 minutes) until md has no resync, recovery or
// check running on md.
func mdIdle(t testing.TB, md string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		act := mdAttr(t, md, "sync_action")
		if act == "idle" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is still in %q after 5 minutes (sync_completed %s)", md, act, mdAttr(t, md, "sync_completed"))
		}
		time.Sleep(200 * time.Millisecond)
	}
}
