package convert

import (
	"cmp"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

// Power cuts: the host kills QEMU at a random moment of a conversion
// (seeded; the seed is printed), boots again, and checks that nothing
// activates the half-converted disk, that resume finishes, and that every
// write acknowledged before the cut is there. A QEMU kill keeps every
// write QEMU had received: it models a power cut after the disk's cache
// was written out; lost volatile caches are the dm-log-writes test's job.

// buildGuestBinaries builds this package's test binary and the dmconvert
// command (with tags), statically, into dir.
func buildGuestBinaries(t *testing.T, dir string, tags string) {
	t.Helper()
	build := func(args ...string) {
		cmd := exec.Command("go", args...)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	build("test", "-c", "-o", filepath.Join(dir, "convert.test"), ".")
	a := []string{"build", "-o", filepath.Join(dir, "dmconvert")}
	if tags != "" {
		a = append(a, "-tags", tags)
	}
	build(append(a, "../cmd/dmconvert")...)
}

// bootScript runs one guest test function of convert.test from a tmpfs
// copy (running from 9p is slow), with dmconvert next to it.
func bootScript(test string) string { return bootScriptEnv(test, "") }

// bootScriptEnv is bootScript with one more environment assignment
// (NAME=value, or "").
func bootScriptEnv(test, env string) string {
	export := ""
	if env != "" {
		export = "export " + env + "\n"
	}
	return fmt.Sprintf(`set -e
cp convert.test dmconvert /tmp/
export DMCONVERT_BIN=/tmp/dmconvert
%sexec /tmp/convert.test -test.run '^%s$' -test.v -test.count=1
`, export, test)
}

// pcOpEnv names the operation a power-cut boot runs: encrypt (the
// default), decrypt or rekey.
const pcOpEnv = "DMCONVERT_PC_OP"

func envInt(name string, def int64) int64 {
	if v, err := strconv.ParseInt(os.Getenv(name), 10, 64); err == nil {
		return v
	}
	return def
}

// vmPowerCut (TestVMPowerCut): DMCONVERT_POWERCUTS cuts of an encrypt (default 5,
// what CI runs; make crashtest N=... runs more) and DMCONVERT_POWERCUTS_OPS
// cuts each of a decrypt, a LUKS2 rekey, a plain dm-crypt rekey and a
// TrueCrypt to LUKS2 conversion (default 1), DMCONVERT_CRASH_SEED to replay.
func vmPowerCut(t *testing.T) {
	testvm.RequireVM(t)
	t.Parallel()
	seed := envInt("DMCONVERT_CRASH_SEED", time.Now().UnixNano())
	cuts := int(envInt("DMCONVERT_POWERCUTS", 3))
	opCuts := int(envInt("DMCONVERT_POWERCUTS_OPS", 1))
	ops := make([]string, 0, cuts+5*opCuts)
	for i := 0; i < cuts; i++ {
		// Every fifth encrypt cut converts a PV of a two-PV volume group
		// and reboots with the other PV under another device name.
		if i%5 == 4 || cuts < 5 && i == cuts-1 {
			ops = append(ops, pc2PV)
			continue
		}
		ops = append(ops, "encrypt")
	}
	for i := 0; i < opCuts; i++ {
		// The LUKS rekey cut is of a LUKS2 volume, a LUKS1 one with a
		// 256-bit key (a gap), one with cryptsetup's default 512-bit key
		// (in place), or an aes-cbc-essiv:sha256 one rekeyed to
		// aes-xts-plain64/512 (in place, every keyslot moved), by seed:
		// the same time, every kind over the runs.
		rekey := []string{"rekey", pcLUKS1, pcLUKS1InPlace, pcLUKS1Cipher}[((seed+int64(i))%4+4)%4]
		ops = append(ops, "decrypt", pcDecryptFS, rekey, pcPlain, pcTCrypt)
	}
	if only := os.Getenv("DMCONVERT_PC_ONLY"); only != "" {
		// One kind of cut only (encrypt, encrypt-2pv, decrypt,
		// decrypt-fs, rekey, rekey-luks1, rekey-luks1-inplace,
		// rekey-luks1-cipher, rekey-plain, rekey-tcrypt).
		ops = ops[:0]
		for i := 0; i < cuts; i++ {
			ops = append(ops, only)
		}
	}
	t.Logf("power-cut seed %d (DMCONVERT_CRASH_SEED=%d to replay), %d cuts: %d of an encrypt, %d each of a decrypt (LVM, and a file system on the mapping), a rekey (LUKS2, LUKS1, LUKS1 in place, or LUKS1 to another cipher), a plain rekey and a TrueCrypt conversion", seed, seed, len(ops), cuts, opCuts)
	rng := rand.New(rand.NewSource(seed))
	ctx := context.Background()
	img, err := testvm.Prepare(ctx)
	if err != nil {
		t.Fatal(err)
	}
	bins := t.TempDir()
	buildGuestBinaries(t, bins, "")
	var mu sync.Mutex
	results := map[string]int{}
	var vmTime, vmCPU time.Duration // every boot's wall time and QEMU CPU
	account := func(r testvm.Result) {
		mu.Lock()
		vmTime += r.Elapsed
		vmCPU += r.CPU
		mu.Unlock()
	}
	t.Cleanup(func() {
		t.Logf("power cuts by state found afterwards: %v; %.0fs of VMs, %.0fs of QEMU CPU", results, vmTime.Seconds(), vmCPU.Seconds())
	})
	for i, op := range ops {
		// Delay after the first progress event: anywhere in the run, and
		// a little past its end.
		delay := time.Duration(rng.Int63n(int64(6 * time.Second)))
		name := fmt.Sprintf("cut%d", i)
		if op != "encrypt" {
			name = fmt.Sprintf("cut%d-%s", i, op)
		}
		env := pcOpEnv + "=" + op
		i := i
		t.Run(name, func(t *testing.T) {
			vmParallel(t)
			dir := t.TempDir()
			pv, state := filepath.Join(dir, "pv.img"), filepath.Join(dir, "state.img")
			// Each cut's VMs get a share of their own (the guest reads
			// its script there), with the binaries linked in.
			share := filepath.Join(dir, "share")
			if err := os.Mkdir(share, 0o755); err != nil {
				t.Fatal(err)
			}
			for _, f := range []string{"convert.test", "dmconvert"} {
				if err := os.Link(filepath.Join(bins, f), filepath.Join(share, f)); err != nil {
					t.Fatal(err)
				}
			}
			pvSize := int64(80 * guestMiB)
			if op == pcTCrypt {
				pvSize = 48 * guestMiB // 128 KiB steps: a smaller volume
			}
			testvm.CreateDisk(pv, pvSize)
			testvm.CreateDisk(state, 64*guestMiB)
			disks := []string{pv, state}
			disks2 := disks
			if op == pc2PV {
				// The VG's other PV is /dev/vdc at the conversion, /dev/vdd
				// after the cut (a blank disk takes its name).
				pv2, blank := filepath.Join(dir, "pv2.img"), filepath.Join(dir, "blank.img")
				testvm.CreateDisk(pv2, 32*guestMiB)
				testvm.CreateDisk(blank, 16*guestMiB)
				disks = []string{pv, state, pv2}
				disks2 = []string{pv, state, blank, pv2}
			}
			// The cut's two boots are one guest test in make test's totals.
			rep := testvm.Report{Package: "github.com/dmconvert/dmconvert/convert", Test: t.Name(), Ran: 1,
				KernelPackage: img.KernelPackage + " " + img.KernelPackageVersion, Started: float64(time.Now().UnixNano()) / 1e9}
			defer func() {
				if t.Failed() {
					rep.Failed = 1
				} else {
					rep.Passed = 1
				}
				if err := rep.Save(); err != nil {
					t.Error(err)
				}
			}()
			addBoot := func(r testvm.Result) {
				account(r)
				rep.TotalSeconds += r.Elapsed.Seconds()
				rep.CPUSeconds += r.CPU.Seconds()
				if rep.Kernel == "" {
					rep.Kernel = r.GuestKernel
				}
			}
			vm, err := testvm.Start(ctx, testvm.Config{Image: img, Disks: disks, Share: share, Script: bootScriptEnv("TestBootPowerCutStart", env), Timeout: 5 * time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			wctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
			defer cancel()
			if err := vm.WaitForConsole(wctx, "DMCONVERT-CONVERTING"); err != nil {
				vm.Kill()
				res, _ := vm.Wait()
				t.Fatalf("the conversion never started: %v\n%s\nconsole:\n%s", err, res.Report(), tail(res.Console, 80))
			}
			time.Sleep(delay)
			vm.Kill()
			res, _ := vm.Wait()
			addBoot(res)
			firstConsole := tail(res.Console, 40)
			finished := strings.Contains(string(res.Console), "DMCONVERT-FINISHED")
			t.Logf("%s: cut %v after the first progress event (conversion finished before the cut: %v)", op, delay, finished)
			res, err = testvm.Run(ctx, testvm.Config{Image: img, Disks: disks2, Share: share, Script: bootScriptEnv("TestBootPowerCutResume", env), Timeout: 5 * time.Minute})
			addBoot(res)
			if err != nil || res.ExitCode != 0 {
				t.Fatalf("after the power cut of %s (seed %d, cut %d, delay %v): exit %d, %v\n%s\nconsole:\n%s\nthe first boot's console, up to the cut:\n%s", op, seed, i, delay, res.ExitCode, err, res.Report(), tail(res.Console, 80), firstConsole)
			}
			for _, l := range strings.Split(string(res.Console), "\n") {
				if k, ok := strings.CutPrefix(strings.TrimSpace(l), "DMCONVERT-CUT-STATE "); ok {
					mu.Lock()
					results[k]++
					mu.Unlock()
					t.Logf("state found after the cut: %s", k)
				}
			}
		})
	}
}

const pcTag = "pc"

// pcPlain is the power-cut operation that rekeys a plain dm-crypt mapping
// with a PV on it (the key files live on the state disk).
const pcPlain = "rekey-plain"

// pcTCrypt is the power-cut operation that turns a TrueCrypt volume (made
// by tcplay) with a PV on it into LUKS2 with a detached header (on the
// state disk).
const pcTCrypt = "rekey-tcrypt"

// pcLUKS1 is the power-cut operation that rekeys a LUKS1 volume with a PV
// on it (its disguised header mid-run: nothing opens it).
const pcLUKS1 = "rekey-luks1"

// pcLUKS1InPlace is the power-cut operation that rekeys a LUKS1 volume
// of cryptsetup's default layout (a 512-bit key, no room for a gap: the
// data is rewritten in place) with a PV on it.
const pcLUKS1InPlace = "rekey-luks1-inplace"

// pcLUKS1Cipher is the power-cut operation that rekeys an
// aes-cbc-essiv:sha256 LUKS1 volume (256-bit key) with a PV on it to
// aes-xts-plain64 with a 512-bit key (in place, every keyslot moved to
// the 512-bit layout at the end).
const pcLUKS1Cipher = "rekey-luks1-cipher"

// pcDecryptFS is the power-cut operation that decrypts an ext4 mounted
// directly on a LUKS2 mapping (the header-gap decrypt).
const pcDecryptFS = "decrypt-fs"

// pc2PV is the power-cut operation that encrypts one PV of a two-PV VG
// (an LV spans both); the other PV changes its name across the cut.
const pc2PV = "encrypt-2pv"

// pcOp is the operation of this power-cut boot.
func pcOp() string {
	if op := os.Getenv(pcOpEnv); op != "" {
		return op
	}
	return "encrypt"
}

// TestBootPowerCutStart (first boot): a live stack with writers, then
// dmconvert encrypt (or decrypt, or rekey: DMCONVERT_PC_OP); it prints
// DMCONVERT-CONVERTING at the first progress event and waits to be killed.
func TestBootPowerCutStart(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := mountState(t, d[1], true)
	writePW(t)
	var st *stack
	var args []string
	switch op := pcOp(); op {
	case "encrypt":
		st = buildLightSized(t, pcTag, d[0], state, "32m", "8m")
		args = encryptArgs(st, state, "--chunk-size", "4M")
	case pc2PV:
		st = buildTwoPV(t, pcTag, d[0], d[2], state)
		args = encryptArgs(st, state, "--chunk-size", "4M")
	case "decrypt", "rekey":
		var name string
		st, name = luksStackSized(t, pcTag, d[0], state, "32m", "8m")
		args = []string{op, name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", st.file(state, "journal"), "--chunk-size", "4M"}
		if op == "decrypt" {
			args = append(args, "--shrink-pv")
		}
	case pcLUKS1:
		// cryptsetup's LUKS1 layout with a 256-bit key: a 1016 KiB gap.
		var name string
		st, name = luksStackFormat(t, pcTag, d[0], state, "32m", "8m", "--type", "luks1", "--cipher", "aes-xts-plain64", "--key-size", "256")
		args = []string{"rekey", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", st.file(state, "journal")}
	case pcLUKS1Cipher:
		var name string
		st, name = luksStackFormat(t, pcTag, d[0], state, "32m", "8m", "--type", "luks1", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256")
		args = []string{"rekey", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", st.file(state, "journal"),
			"--cipher", "aes-xts-plain64", "--key-size", "512"}
	case pcLUKS1InPlace:
		var name string
		st, name = luksStackFormat(t, pcTag, d[0], state, "32m", "8m", "--type", "luks1")
		args = []string{"rekey", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", st.file(state, "journal")}
	case pcTCrypt:
		st = tcryptLVMStack(t, pcTag, d[0], state, "32m", "4m")
		args = []string{"rekey", st.VG + "_crypt", "--header", filepath.Join(state, "pc.hdr"), "--key-file", pwFile,
			"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--batch-mode", "--json", "--journal", st.file(state, "journal")}
	case pcDecryptFS:
		var name string
		st, name = fsOnMapping(t, pcTag, d[0], state)
		args = []string{"decrypt", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", st.file(state, "journal"), "--chunk-size", "4M"}
	case pcPlain:
		st = plainLVMStack(t, pcTag, d[0], state, "40m", "8m")
		args = []string{"rekey", st.VG + "_crypt", "--new-key-file", filepath.Join(state, "pc-new.key"), "--batch-mode", "--json",
			"--journal", st.file(state, "journal"), "--chunk-size", "1M"}
	default:
		t.Fatalf("%s=%q: not an operation", pcOpEnv, op)
	}
	w := startWriter(t, st, state)
	_ = w
	start := time.Now()
	r := cliStart(t, args...)
	r.waitProgress(t, 0)
	fmt.Println("DMCONVERT-CONVERTING")
	os.Stdout.Sync()
	go func() {
		// How far the run got before the cut, on the console (the host
		// shows it when the second boot fails).
		for m := range r.lines {
			fmt.Printf("DMCONVERT-EVENT %v %.3fs\n", m, time.Since(start).Seconds())
		}
	}()
	code, errOut := r.wait()
	if code != 0 {
		t.Fatalf("%s: exit %d: %s", args[0], code, errOut)
	}
	fmt.Println("DMCONVERT-FINISHED")
	os.Stdout.Sync()
	select {} // the writers go on until the power goes
}

// TestBootPowerCutResume (second boot): nothing may map the half-converted
// disk wrongly; resume finishes; everything acknowledged is there.
func TestBootPowerCutResume(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := mountState(t, d[1], false)
	writePW(t)
	op := pcOp()
	if op == pc2PV {
		op = "encrypt" // the checks are an encrypt's; the other PV moved
		if _, err := os.Stat("/dev/vdd"); err != nil {
			t.Fatal("the second boot of a two-PV cut has no /dev/vdd: the other PV did not move")
		}
	}
	st := loadStack(t, state, pcTag)
	jpath := st.file(state, "journal")
	switch op {
	case pcPlain:
		plainPowerCutResume(t, st, state, jpath)
		return
	case pcTCrypt:
		tcryptPowerCutResume(t, st, state, jpath)
		return
	case pcDecryptFS:
		decryptFSPowerCutResume(t, st, state, jpath)
		return
	}
	name := filepath.Base(st.Disk) + "_crypt"
	first := make([]byte, 4096)
	if f, err := os.Open(st.Disk); err == nil {
		f.ReadAt(first, 0)
		f.Close()
	}
	id := Identify(first)
	fmt.Println("DMCONVERT-CUT-STATE", op+"-"+strings.ReplaceAll(id.String(), " ", "-"))
	// What a boot does: pvscan autoactivation, vgchange -ay, and a
	// cryptsetup open by a crypttab entry.
	shOK("pvscan", "--cache", "-aay")
	shOK("vgchange", "-ay", st.VG)
	if id == IdentityLVM {
		// The disk carries a PV label (encrypt: not switched yet;
		// decrypt: switched back): whatever LVM activated on it must hold
		// every acknowledged write (invariant 3).
		if _, err := os.Stat("/dev/mapper/" + st.VG + "-ext"); err == nil {
			verifyStack(t, st, state)
			for _, mp := range st.Mounts {
				sh(t, "umount", mp)
			}
		}
	} else {
		if out, err := shOK("dmsetup", "ls"); err == nil && strings.Contains(out, st.VG+"-") {
			t.Fatalf("LVM activated LVs of the half-converted disk %s:\n%s", st.Disk, out)
		}
		if _, err := shOK("cryptsetup", "open", "--key-file", pwFile, st.Disk, "crashopen"); err == nil {
			// Only an unmarked header opens (encrypt and rekey: the cut
			// came after the last header write; decrypt and rekey: before
			// the run marked it): then every sector must be in place
			// under it.
			if dump := sh(t, "cryptsetup", "luksDump", st.Disk); strings.Contains(dump, "dmconvert") {
				t.Fatalf("stock cryptsetup opened the half-converted disk %s although its header is marked:\n%s", st.Disk, dump)
			}
			fmt.Println("DMCONVERT-CUT-STATE", op+"-unmarked-header")
			sh(t, "vgchange", "-ay", st.VG)
			verifyStack(t, st, state)
			for _, mp := range st.Mounts {
				sh(t, "umount", mp)
			}
			sh(t, "vgchange", "-an", st.VG)
			sh(t, "cryptsetup", "close", "crashopen")
		}
	}
	code, out := cliRun(t, "status", "--journal", jpath, "--json")
	switch {
	case code != 0 && strings.Contains(out, "does not exist"):
		// Cut before the run recorded anything: the disk is untouched.
		want := IdentityLUKS
		if op == "encrypt" {
			want = IdentityLVM
		}
		if id != want {
			t.Fatalf("no journal but the disk shows %v", id)
		}
		if op != "encrypt" {
			sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, name)
		}
		shOK("vgchange", "-ay", st.VG)
		verifyStack(t, st, state)
		return
	case code != 0:
		t.Fatalf("status after the cut: exit %d:\n%s", code, out)
	case strings.Contains(out, `"done"`):
		if op != "decrypt" {
			sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, name)
		}
	default:
		code, out = cliRun(t, "resume", "--journal", jpath, "--key-file", pwFile)
		requireExit(t, "resume after the power cut", code, 0, out)
	}
	shOK("vgchange", "-ay", st.VG)
	verifyStack(t, st, state)
	want := "crypto_LUKS"
	if op == "decrypt" {
		want = "LVM2_member"
	}
	if typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", st.Disk); strings.TrimSpace(typ) != want {
		t.Fatalf("after the %s's resume %s is %q, not %s", op, st.Disk, typ, want)
	}
	if want == "crypto_LUKS" {
		if dump := sh(t, "cryptsetup", "luksDump", st.Disk); strings.Contains(dump, "dmconvert") {
			t.Fatalf("after the %s's resume the header of %s is still marked:\n%s", op, st.Disk, dump)
		}
	}
	// The cold open of a finished disk is checked by TestVM and the CLI
	// tests; a power cut's job is the states in between.
}

// buildTwoPV: VG vg<tag> on disk (shrunk, room for the header) and
// other; the raw LV on disk, the ext4 LV spanning disk and other, so
// that every LV needs the disk being converted.
func buildTwoPV(t testing.TB, tag, disk, other, state string) *stack {
	t.Helper()
	size := diskSectors(t, disk)
	pvSize := size - 2*32768
	vg := "vg" + tag
	sh(t, "pvcreate", "-y", "--setphysicalvolumesize", fmt.Sprintf("%ds", pvSize), disk)
	sh(t, "pvcreate", "-y", other)
	sh(t, "vgcreate", "-y", vg, disk, other)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "8m", vg, disk)
	free := strings.TrimSpace(sh(t, "pvs", "--noheadings", "--units", "m", "--nosuffix", "-o", "pv_free", disk))
	mib, err := strconv.ParseFloat(free, 64)
	if err != nil {
		t.Fatalf("pv_free of %s: %q", disk, free)
	}
	// All of the disk's free extents and 16 MiB of the other PV's.
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", fmt.Sprintf("%dm", int(mib)+16), vg, disk, other)
	return extRawStack(t, tag, disk, state, vg, pvSize)
}

// buildLightTagged is a smaller stack (ext4 and a raw LV, no xfs) for the
// many-boot tests.
func buildLightTagged(t testing.TB, tag, disk, state string) *stack {
	return buildLightSized(t, tag, disk, state, "96m", "16m")
}

func buildLightSized(t testing.TB, tag, disk, state, extSize, rawSize string) *stack {
	t.Helper()
	size := diskSectors(t, disk)
	pvSize := size - 2*32768
	vg := "vg" + tag
	sh(t, "pvcreate", "-y", "--setphysicalvolumesize", fmt.Sprintf("%ds", pvSize), disk)
	sh(t, "vgcreate", "-y", vg, disk)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", extSize, vg)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", rawSize, vg)
	return extRawStack(t, tag, disk, state, vg, pvSize)
}

// extRawStack activates VG vg (LVs ext and raw, on disk's PV of pvSize
// sectors), puts ext4 on ext, mounts it and writes the manifest.
func extRawStack(t testing.TB, tag, disk, state, vg string, pvSize uint64, mkfsOpts ...string) *stack {
	t.Helper()
	sh(t, "vgchange", "-ay", vg)
	st := &stack{Tag: tag, Disk: disk, VG: vg, PVSize: pvSize, RawLV: "/dev/mapper/" + vg + "-raw"}
	dev := "/dev/mapper/" + vg + "-ext"
	mp := "/mnt/" + tag + "-ext"
	sh(t, "mkfs.ext4", append(append([]string{"-q", "-F"}, mkfsOpts...), dev)...)
	os.MkdirAll(mp, 0o755)
	sh(t, "mount", dev, mp)
	st.Mounts, st.FSLVs, st.FSTypes, st.Sizes = []string{mp}, []string{"ext"}, []string{"ext4"}, []uint64{blockDevBytes(t, dev)}
	writeManifest(t, st, state)
	return st
}

var _ = syscall.SIGINT

// tail returns the last n lines of b.
func tail(b []byte, n int) string {
	l := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// plainPowerCutResume is the second boot of a plain rekey's power cut:
// nothing is open (a plain volume must not be in crypttab during the run);
// boot-time LVM finds nothing on the raw disk; the old key shows the PV
// only if the run never rewrote a chunk; resume with the old key file
// finishes; every acknowledged write is there under the new key.
func plainPowerCutResume(t *testing.T, st *stack, state, jpath string) {
	name := st.VG + "_crypt"
	oldKey, newKey := filepath.Join(state, "pc-old.key"), filepath.Join(state, "pc-new.key")
	switch headerlessCutState(t, st, jpath, pcPlain) {
	case cutNotStarted:
		// Cut before the run recorded anything: the old key opens it all.
		plainOpen(t, st.Disk, name, oldKey, "512")
	case cutDone:
		plainOpen(t, st.Disk, name, newKey, "512")
	default:
		code, out := cliRun(t, "resume", "--journal", jpath, "--old-key-file", oldKey)
		requireExit(t, "resume after the power cut", code, 0, out)
	}
	sh(t, "vgchange", "-ay", st.VG)
	verifyStack(t, st, state)
	if _, err := os.Stat(newKey); err == nil {
		for _, mp := range st.Mounts {
			sh(t, "umount", mp)
		}
		sh(t, "vgchange", "-an", st.VG)
		sh(t, "cryptsetup", "close", name)
		oldKeySeesNothing(t, st.Disk, oldKey)
	}
}

// The states headerlessCutState finds.
const (
	cutNotStarted = "not-started"
	cutDone       = "done"
	cutInProgress = "in-progress"
)

// headerlessCutState is the start of the second boot of a cut run whose
// disk carries no mark a boot-time tool sees (a plain or TrueCrypt
// source): boot-time LVM must activate nothing from the raw disk; then
// dmconvert status says how far the run got, which is printed for the
// host (DMCONVERT-CUT-STATE op-state) and returned.
func headerlessCutState(t *testing.T, st *stack, jpath, op string) string {
	t.Helper()
	shOK("pvscan", "--cache", "-aay")
	shOK("vgchange", "-ay", st.VG)
	if out, err := shOK("dmsetup", "ls"); err == nil && strings.Contains(out, st.VG+"-") {
		t.Fatalf("LVM activated LVs from the raw disk %s:\n%s", st.Disk, out)
	}
	code, out := cliRun(t, "status", "--journal", jpath, "--json")
	state := cutInProgress
	switch {
	case code != 0 && (strings.Contains(out, "does not exist") || strings.Contains(out, "holds no conversion run")):
		state = cutNotStarted
	case code != 0:
		t.Fatalf("status after the cut: exit %d:\n%s", code, out)
	case strings.Contains(out, `"done"`):
		state = cutDone
	}
	fmt.Println("DMCONVERT-CUT-STATE", op+"-"+state)
	return state
}

// decryptFSPowerCutResume is the second boot of a decrypt-fs cut. What a
// boot does: cryptsetup open (crypttab), then mount the file system by
// its UUID (fstab). Stock cryptsetup must open nothing but an unmarked
// header; a file system found on the raw disk must be whole (then the
// system uses it, and resume must keep its writes); resume finishes.
func decryptFSPowerCutResume(t *testing.T, st *stack, state, jpath string) {
	name := st.VG + "-crypt"
	typ, _ := fsUUID(t, st.Disk)
	fmt.Println("DMCONVERT-CUT-STATE", pcDecryptFS+"-disk-shows-"+cmp.Or(typ, "nothing"))
	switch typ {
	case "crypto_LUKS":
		if _, err := shOK("cryptsetup", "open", "--key-file", pwFile, st.Disk, name); err == nil {
			if dump := sh(t, "cryptsetup", "luksDump", st.Disk); strings.Contains(dump, "dmconvert") {
				t.Fatalf("stock cryptsetup opened the half-decrypted disk %s although its header is marked:\n%s", st.Disk, dump)
			}
			// Unmarked: the run had not begun; everything is under it.
			verifyStack(t, st, state)
			for _, mp := range st.Mounts {
				sh(t, "umount", mp)
			}
			sh(t, "cryptsetup", "close", name)
		}
	case "ext4":
		// The head is back: the whole file system is on the raw disk.
		// The system mounts it and writes (the writer goes on).
		done := onRawDisk(t, st)
		verifyStack(t, st, state)
		w := startWriter(t, st, state)
		time.Sleep(time.Second)
		w.finish(t)
		done()
	case "":
		if out, err := shOK("cryptsetup", "open", "--key-file", pwFile, st.Disk, name); err == nil {
			t.Fatalf("stock cryptsetup opened the half-decrypted disk %s:\n%s", st.Disk, out)
		}
	default:
		t.Fatalf("blkid -p finds %q on the half-decrypted disk %s", typ, st.Disk)
	}
	code, out := cliRun(t, "status", "--journal", jpath, "--json")
	switch {
	case code != 0 && strings.Contains(out, "does not exist"):
		if typ != "crypto_LUKS" {
			t.Fatalf("no journal but the disk shows %q", typ)
		}
		sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, name)
		verifyStack(t, st, state)
		return
	case code != 0:
		t.Fatalf("status after the cut: exit %d:\n%s", code, out)
	case strings.Contains(out, `"done"`):
	default:
		code, out = cliRun(t, "resume", "--journal", jpath, "--key-file", pwFile)
		requireExit(t, "resume after the power cut", code, 0, out)
	}
	if _, err := shOK("dmsetup", "info", name); err == nil {
		// Resume mapped it again and finished: the mapping is linear.
		verifyStack(t, st, state)
		for _, mp := range st.Mounts {
			sh(t, "umount", mp)
		}
		sh(t, "dmsetup", "remove", name)
	}
	if typ, _ := fsUUID(t, st.Disk); typ != "ext4" {
		t.Fatalf("after the decrypt's resume blkid -p %s finds %q, not ext4", st.Disk, typ)
	}
	done := onRawDisk(t, st)
	defer done()
	verifyStack(t, st, state)
}
