package convert

import (
	"bytes"
	"fmt"
	mrand "math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

// Every failpoint, for real: dmconvert (built with -tags failpoints) dies
// at it with no cleanup at all, under a writer; then resume, or abort,
// must finish with every file and every acknowledged record intact.

// TestVMFailpoints runs the failpoint matrix: every failpoint followed by
// resume in one VM, by abort in another (the two run in parallel).
func TestVMFailpoints(t *testing.T) {
	testvm.RequireVM(t)
	t.Parallel()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-tags", "failpoints", "-o", filepath.Join(dir, "dmconvert"), "../cmd/dmconvert")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building dmconvert with failpoints: %v\n%s", err, out)
	}
	recs := []string{"Resume", "Abort"}
	if os.Getenv("DMCONVERT_FP_REKEY") != "" {
		recs = append(recs, "Rekey")
	} else {
		t.Log("rekey failpoints are opt-in (DMCONVERT_FP_REKEY=n or all): see TestOptInGuestFailpointsRekey")
	}
	for _, rec := range recs {
		t.Run(rec, func(t *testing.T) {
			t.Parallel()
			// Small disks: the cases copy the whole PV (or data area) again
			// and again; 40 MiB of data is 10 chunks of 4 MiB (every per-chunk
			// failpoint still has a 9th hit).
			size := int64(48 * guestMiB)
			if rec == "Rekey" {
				size = int64(56 * guestMiB) // 16 MiB of LUKS2 header in front
			}
			env := map[string]string{}
			for _, k := range []string{"DMCONVERT_FP_REKEY", "DMCONVERT_FP_SEED", "DMCONVERT_FP_ONLY"} {
				if v := os.Getenv(k); v != "" {
					env[k] = v
				}
			}
			testvm.RunTestsInGuest(t, testvm.Options{
				Env:     env,
				Disks:   []testvm.Disk{{Size: size}, {Size: 64 * guestMiB}},
				Run:     "^Test(OptIn)?GuestFailpoints" + rec + "$",
				Files:   map[string]string{"dmconvert": filepath.Join(dir, "dmconvert")},
				Timeout: 40 * time.Minute,
			})
		})
	}
}

func TestGuestFailpointsResume(t *testing.T) { guestFailpoints(t, "resume") }
func TestGuestFailpointsAbort(t *testing.T)  { guestFailpoints(t, "abort") }

// rekeyMisses are the failpoints a rekey never reaches (it has no
// identity switch and never restacks: the mapping stays where it is).
var rekeyMisses = map[string]bool{
	"restack:device-after": true, "unstack:device-after": true,
	"switch:label-written": true, "switch:header-written": true,
}

// TestOptInGuestFailpointsRekey: a LUKS2 disk with LVM on it, in use; for
// each failpoint a rekey reaches, from the same pristine disk: writer on,
// rekey dies at the failpoint, then resume (even cases) or abort (odd
// cases; resume when too late), verify every file and acknowledged
// record, and which key opens the disk.
//
// Opt-in (DMCONVERT_FP_REKEY=n|all), not part of make test: in 2 of
// about 45 cases run in sequence (and 0 of 2 run alone) the dying
// `dmconvert rekey` (at resume:before#9 and at finalize:helpers-removed)
// hung in the kernel (hung-task warnings for the process; its kernel
// stack was not captured), leaving the VM stuck. watchBlocked and the
// command timeouts now print the stacks and device states when it
// happens. Until that is understood and fixed, the rekey's crash safety
// rests on the unit crash matrix and the CLI interrupt/kill/abort tests.
func TestOptInGuestFailpointsRekey(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	disk := d[0]
	state := guestStateDir(t, d[1])
	writePW(t)
	defer watchBlocked(t)()
	st, name := luksStackSized(t, "fpr", disk, state, "24m", "8m")
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "vgchange", "-an", st.VG)
	oldKey := saveVolumeKey(t, disk, "/tmp/fpr-old.key")
	sh(t, "cryptsetup", "close", name)
	pristine := diskBytes(t, disk)
	man, _ := os.ReadFile(st.file(state, "manifest"))
	var points []string
	for _, fp := range Failpoints {
		if !rekeyMisses[fp] {
			points = append(points, fp)
		}
	}
	// CI runs a seeded sample (the rekey's crash safety is proven point
	// by point by the unit crash matrix; this proves it on the kernel);
	// DMCONVERT_FP_REKEY=all runs every point, =n that many.
	all := len(points)
	n := 6
	if v := os.Getenv("DMCONVERT_FP_REKEY"); v == "all" {
		n = all
	} else if k, err := strconv.Atoi(v); err == nil && k > 0 {
		n = min(k, all)
	}
	seed := time.Now().UnixNano()
	if v, err := strconv.ParseInt(os.Getenv("DMCONVERT_FP_SEED"), 10, 64); err == nil {
		seed = v
	}
	rng := mrand.New(mrand.NewSource(seed))
	if n < all {
		rng.Shuffle(len(points), func(i, j int) { points[i], points[j] = points[j], points[i] })
		points = points[:n]
	}
	if v := os.Getenv("DMCONVERT_FP_ONLY"); v != "" {
		points = []string{v} // one failpoint (with DMCONVERT_FP_SEED: odd = abort first)
	}
	t.Logf("rekey failpoints: %d of %d, seed %d (DMCONVERT_FP_SEED to replay, DMCONVERT_FP_REKEY=all for every one)", n, all, seed)
	cases, passed := 0, 0
	for i, fp := range points {
		rec := "resume"
		if (i+int(seed&1))%2 == 1 {
			rec = "abort"
		}
		cases++
		ok := t.Run(fp+"/"+rec, func(t *testing.T) {
			cleanupGuest(st)
			restoreDisk(t, disk, pristine)
			os.WriteFile(st.file(state, "manifest"), man, 0o644)
			os.Remove(st.file(state, "acks"))
			os.Remove(st.file(state, "journal"))
			sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
			sh(t, "vgchange", "-ay", st.VG)
			for i, mp := range st.Mounts {
				sh(t, "mount", "/dev/mapper/"+st.VG+"-"+st.FSLVs[i], mp)
			}
			w := startWriter(t, st, state)
			j := st.file(state, "journal")
			code, out := cliRunEnv(t, []string{fmt.Sprintf("DMCONVERT_FAILPOINT=%s:%d", fp, fpHit(fp))},
				"rekey", name, "--batch-mode", "--key-file", pwFile, "--journal", j, "--chunk-size", "4M")
			if code != FailpointExitCode {
				w.finish(t)
				t.Fatalf("dmconvert rekey did not stop at failpoint %s#%d: exit %d\n%s", fp, fpHit(fp), code, out)
			}
			code, rout := cliRun(t, rec, "--journal", j, "--key-file", pwFile)
			switch {
			case code != 0 && strings.Contains(rout, "already"):
				code = 0 // the failpoint came after the final commit
			case code != 0 && rec == "abort" && strings.Contains(rout, "too late"):
				code, rout = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
			}
			t.Logf("dmconvert %s after dying at %s: exit %d\n%s", rec, fp, code, rout)
			acks, _ := w.finish(t)
			if code != 0 {
				t.Fatalf("%s after dying at %s: exit %d", rec, fp, code)
			}
			verifyStack(t, st, state)
			if dump := sh(t, "cryptsetup", "luksDump", disk); strings.Contains(dump, "dmconvert") {
				t.Fatalf("after %s the header still carries dmconvert's marks:\n%s", rec, dump)
			}
			nk := saveVolumeKey(t, disk, "/tmp/fpr-now.key")
			t.Logf("%s/%s: %d acknowledged writes verified; volume key changed: %v", fp, rec, acks, !bytes.Equal(nk, oldKey))
			if rec == "resume" && bytes.Equal(nk, oldKey) {
				t.Fatal("resume finished, but the disk still has the old key")
			}
			for _, mp := range st.Mounts {
				shOK("umount", mp)
			}
			shOK("vgchange", "-an", st.VG)
			shOK("cryptsetup", "close", name)
		})
		if ok {
			passed++
		}
	}
	t.Logf("rekey failpoint cases: %d run, %d passed", cases, passed)
}

// fpHit picks which hit of a failpoint to die at: per-chunk points die in
// the middle of the run, the others at their first (often only) hit.
func fpHit(name string) int {
	switch name {
	case "intent:before", "intent:after", "load:before", "load:after", "suspend:after",
		"resume:before", "resume:after", "sync:after", "flush:after",
		"checkpoint:before", "checkpoint:after", "commit:before", "commit:after":
		return 9
	}
	return 1
}

// guestFailpoints: for each failpoint, from the same pristine disk image:
// writer on, encrypt dies at the failpoint (exit 113), then rec (resume
// or abort), verify every file and acknowledged record.
func guestFailpoints(t *testing.T, rec string) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	disk := d[0]
	state := guestStateDir(t, d[1])
	writePW(t)
	// One pristine stack, saved, restored before every case.
	st := buildSmallStack(t, "fp", disk, state, 8192, "24m")
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "vgchange", "-an", st.VG)
	pristine := diskBytes(t, disk)
	man, _ := os.ReadFile(st.file(state, "manifest"))
	cases, passed := 0, 0
	for _, fp := range Failpoints {
		{
			cases++
			ok := t.Run(fp, func(t *testing.T) {
				cleanupGuest(st)
				restoreDisk(t, disk, pristine)
				os.WriteFile(st.file(state, "manifest"), man, 0o644)
				os.Remove(st.file(state, "acks"))
				os.Remove(st.file(state, "journal"))
				sh(t, "vgchange", "-ay", st.VG)
				for i, mp := range st.Mounts {
					sh(t, "mount", "/dev/mapper/"+st.VG+"-"+st.FSLVs[i], mp)
				}
				w := startWriter(t, st, state)
				die := func(fp string, hit int, args ...string) {
					code, out := cliRunEnv(t, []string{fmt.Sprintf("DMCONVERT_FAILPOINT=%s:%d", fp, hit)}, args...)
					if code != FailpointExitCode {
						w.finish(t)
						t.Fatalf("dmconvert %s did not stop at failpoint %s#%d: exit %d\n%s", args[0], fp, hit, code, out)
					}
				}
				args := []string{"encrypt", st.Disk, "--batch-mode", "--key-file", pwFile, "--journal", st.file(state, "journal"),
					"--header-size", "4M", "--chunk-size", "4M", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}
				if abortOnly[fp] {
					// Reached only while walking back: stop the run in the
					// middle, then let the abort die there.
					die("commit:after", 9, args...)
					die(fp, 1, "abort", "--journal", st.file(state, "journal"), "--key-file", pwFile)
				} else {
					die(fp, fpHit(fp), args...)
				}
				code, rout := cliRun(t, rec, "--journal", st.file(state, "journal"), "--key-file", pwFile)
				if code != 0 && strings.Contains(rout, "already") {
					// The failpoint came after the final commit.
					code = 0
				}
				acks, _ := w.finish(t)
				if code != 0 {
					t.Fatalf("%s after dying at %s: exit %d\n%s", rec, fp, code, rout)
				}
				verifyStack(t, st, state)
				name := filepath.Base(disk) + "_crypt"
				typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", disk)
				switch {
				case abortOnly[fp]:
					if strings.TrimSpace(typ) != "LVM2_member" {
						t.Fatalf("after an interrupted abort and %s the disk is %q", rec, typ)
					}
				case rec == "resume":
					// The cold open of a converted disk is TestVM's and the
					// CLI tests' job; here: it is LUKS.
					if strings.TrimSpace(typ) != "crypto_LUKS" {
						t.Fatalf("after resume the disk is %q", typ)
					}
				default:
					if strings.TrimSpace(typ) != "crypto_LUKS" && strings.TrimSpace(typ) != "LVM2_member" {
						t.Fatalf("after abort the disk is %q", typ)
					}
				}
				t.Logf("%s/%s: %d acknowledged writes verified", fp, rec, acks)
				for _, mp := range st.Mounts {
					shOK("umount", mp)
				}
				shOK("vgchange", "-an", st.VG)
				shOK("dmsetup", "remove", name)
			})
			if ok {
				passed++
			}
		}
	}
	t.Logf("failpoint cases (%s): %d run, %d passed", rec, cases, passed)
}

// abortOnly are the failpoints only a walk back reaches.
var abortOnly = map[string]bool{"unstack:device-after": true}

// cleanupGuest removes whatever a failed case left behind.
func cleanupGuest(st *stack) {
	for _, mp := range st.Mounts {
		shOK("umount", "-l", mp)
	}
	shOK("dmsetup", "resume", "--noflush", "-f")
	shOK("vgchange", "-an", st.VG)
	shOK("dmsetup", "remove_all", "--force")
}

// restoreDisk writes the saved image back over the disk.
func restoreDisk(t testing.TB, disk string, img []byte) {
	t.Helper()
	f, err := os.OpenFile(disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(img, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	sh(t, "blockdev", "--flushbufs", disk)
}

// buildSmallStack: ext4 LV and raw LV on a PV leaving 2*header sectors
// free at the end.
func buildSmallStack(t testing.TB, tag, disk, state string, header uint64, extSize string) *stack {
	t.Helper()
	size := diskSectors(t, disk)
	pvSize := size - 2*header
	vg := "vg" + tag
	sh(t, "pvcreate", "-y", "--setphysicalvolumesize", fmt.Sprintf("%ds", pvSize), disk)
	sh(t, "vgcreate", "-y", vg, disk)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", extSize, vg)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "8m", vg)
	sh(t, "vgchange", "-ay", vg)
	st := &stack{Tag: tag, Disk: disk, VG: vg, PVSize: pvSize, RawLV: "/dev/mapper/" + vg + "-raw"}
	dev := "/dev/mapper/" + vg + "-ext"
	mp := "/mnt/" + tag + "-ext"
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
	os.MkdirAll(mp, 0o755)
	sh(t, "mount", dev, mp)
	st.Mounts, st.FSLVs, st.FSTypes, st.Sizes = []string{mp}, []string{"ext"}, []string{"ext4"}, []uint64{blockDevBytes(t, dev)}
	writeManifest(t, st, state)
	return st
}
