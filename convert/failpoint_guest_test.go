package convert

import (
	"bytes"
	"fmt"
	mrand "math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

// Every failpoint, for real: dmconvert (built with -tags failpoints) dies
// at it with no cleanup at all, under a writer; then resume, or abort,
// must finish with every file and every acknowledged record intact.

// vmFailpoints boots the VM of one failpoint matrix: encrypt with every
// failpoint followed by resume ("Resume"), the same followed by abort
// ("Abort"), and every failpoint a rekey ("Rekey") or a decrypt
// ("Decrypt") reaches, followed by resume or abort in turn.
func vmFailpoints(t *testing.T, rec string) {
	testvm.RequireVM(t)
	vmParallel(t)
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-tags", "failpoints", "-o", filepath.Join(dir, "dmconvert"), "../cmd/dmconvert")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building dmconvert with failpoints: %v\n%s", err, out)
	}
	// Small disks: the cases copy the whole PV (or data area) again and
	// again, and a chunk's fixed cost (table swaps, flushes, journal
	// commits) dominates under emulation: 32 MiB of data is 8 chunks of
	// 4 MiB, 8-12 chunk steps with the head moves, so every per-chunk
	// failpoint still has a 5th hit. (The ext4 LV needs 24 MiB: the
	// writers' records fill a smaller one.)
	size := int64(40 * guestMiB)
	switch rec {
	case "Rekey":
		size = int64(48 * guestMiB) // 16 MiB of LUKS2 header in front
	case "Decrypt":
		size = int64(64 * guestMiB) // header, a PV shrunk to 32 MiB, room for the head
	}
	env := map[string]string{}
	for _, k := range []string{"DMCONVERT_FP_N", "DMCONVERT_FP_SEED", "DMCONVERT_FP_ONLY", "DMCONVERT_FP_TRACE", "DMCONVERT_WRITER_PAUSE"} {
		if v := os.Getenv(k); v != "" {
			env[k] = v
		}
	}
	testvm.RunTestsInGuest(t, testvm.Options{
		Env:     env,
		Disks:   []testvm.Disk{{Size: size}, {Size: 64 * guestMiB}},
		Run:     "^TestGuestFailpoints" + rec + "$",
		Files:   map[string]string{"dmconvert": filepath.Join(dir, "dmconvert")},
		Timeout: 40 * time.Minute,
	})
}

func TestGuestFailpointsResume(t *testing.T) { guestFailpoints(t, "resume") }
func TestGuestFailpointsAbort(t *testing.T)  { guestFailpoints(t, "abort") }

// opMisses are the failpoints an operation never reaches. A rekey has no
// identity switch and never restacks (the mapping stays where it is); a
// decrypt starts on the user's mapping (nothing to restack), ends by
// unstacking (not by loading a final table and header).
// mirrorOnly are the failpoints of a chunk moved through a mirror, which
// an in-place rewrite does not reach (it writes no header checkpoint
// between its first and last step either).
var mirrorOnly = map[string]bool{"sync:after": true, "flush:after": true, "checkpoint:before": true, "checkpoint:after": true}

var opMisses = map[string]map[string]bool{
	"rekey": {
		"restack:device-after": true, "unstack:device-after": true,
		"switch:label-written": true, "switch:header-written": true,
	},
	"decrypt": {
		"restack:device-after": true, "switch:header-written": true,
		"finalize:table-after": true, "finalize:header-after": true,
	},
}

func TestGuestFailpointsRekey(t *testing.T)   { guestOpFailpoints(t, "rekey") }
func TestGuestFailpointsDecrypt(t *testing.T) { guestOpFailpoints(t, "decrypt") }

// guestOpFailpoints: a LUKS2 disk with LVM on it, in use; for each
// failpoint the operation (rekey or decrypt) reaches, from the same
// pristine disk: writer on, the operation dies at the failpoint, then
// resume (even cases) or abort (odd cases; resume when too late), verify
// every file and acknowledged record, and what the disk is afterwards.
//
// One recovery per point, resume and abort alternating from a printed
// seed (DMCONVERT_FP_SEED replays). make test runs a seeded sample of 4
// of the 18 points (the suite's time budget: every point took 430-500 s
// of one VM per operation; the unit crash matrices cover every point on
// the fake kernel); DMCONVERT_FP_N=all runs every point, =n that many,
// DMCONVERT_FP_ONLY=name one point.
func guestOpFailpoints(t *testing.T, op string) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	disk := d[0]
	state := guestStateDir(t, d[1])
	writePW(t)
	defer watchBlocked(t)()
	seed := time.Now().UnixNano()
	if v, err := strconv.ParseInt(os.Getenv("DMCONVERT_FP_SEED"), 10, 64); err == nil {
		seed = v
	}
	var st *stack
	var name string
	// A rekey's seeds rotate over a LUKS2 volume, a LUKS1 one with a
	// 256-bit key (a 1016 KiB gap), cryptsetup's default LUKS1 layout
	// (a 512-bit key: 24 KiB of room, so the data is rewritten in place)
	// and an aes-cbc-essiv:sha256 LUKS1 volume rekeyed to
	// aes-xts-plain64/512 (in place, every keyslot moved at the end).
	kind := (seed/2%4 + 4) % 4
	if op != "rekey" {
		kind = 0
	}
	inPlace := kind >= 2
	chunk := "4M"
	var extra []string
	switch {
	case kind == 3:
		t.Logf("rekey of an aes-cbc-essiv:sha256 LUKS1 volume to aes-xts-plain64/512, in place (seed %d)", seed)
		st, name = luksStackFormat(t, "fpr", disk, state, "24m", "4m", "--type", "luks1", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256")
		chunk = "1M"
		extra = []string{"--cipher", "aes-xts-plain64", "--key-size", "512"}
	case inPlace:
		t.Logf("rekey in place of a LUKS1 volume with a 512-bit key (seed %d)", seed)
		st, name = luksStackFormat(t, "fpr", disk, state, "24m", "4m", "--type", "luks1")
		chunk = "1M"
	case kind == 1:
		t.Logf("rekey of a LUKS1 volume (seed %d)", seed)
		st, name = luksStackFormat(t, "fpr", disk, state, "24m", "4m", "--type", "luks1", "--cipher", "aes-xts-plain64", "--key-size", "256")
	case op == "rekey":
		st, name = luksStackSized(t, "fpr", disk, state, "24m", "4m")
	default:
		st, name = luksStackSized(t, "fpd", disk, state, "24m", "4m")
	}
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "vgchange", "-an", st.VG)
	oldKeyFile := "/tmp/fp-old.key"
	oldKey := saveVolumeKey(t, disk, oldKeyFile)
	sh(t, "cryptsetup", "close", name)
	pristine := diskBytes(t, disk)
	man, _ := os.ReadFile(st.file(state, "manifest"))
	var points []string
	for _, fp := range Failpoints {
		if opMisses[op][fp] || headerGapOnly[fp] || inPlace && mirrorOnly[fp] || !inPlace && rewriteOnly[fp] {
			continue
		}
		points = append(points, fp)
	}
	all := len(points)
	n := min(4, all)
	if v := os.Getenv("DMCONVERT_FP_N"); v == "all" {
		n = all
	} else if k, err := strconv.Atoi(v); err == nil && k > 0 {
		n = k
	}
	if n < all {
		rng := mrand.New(mrand.NewSource(seed))
		rng.Shuffle(len(points), func(i, j int) { points[i], points[j] = points[j], points[i] })
		points = points[:n]
	}
	if v := os.Getenv("DMCONVERT_FP_ONLY"); v != "" {
		points = []string{v}
	}
	t.Logf("%s failpoints: %d of %d, seed %d (DMCONVERT_FP_SEED to replay)", op, len(points), all, seed)
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
			args := append([]string{op, name, "--batch-mode", "--key-file", pwFile, "--journal", j, "--chunk-size", chunk}, extra...)
			if op == "decrypt" {
				args = append(args, "--shrink-pv")
			}
			code, out := cliRunEnv(t, []string{fmt.Sprintf("DMCONVERT_FAILPOINT=%s:%d", fp, fpHit(fp))}, args...)
			if code != FailpointExitCode {
				w.finish(t)
				t.Fatalf("dmconvert %s did not stop at failpoint %s#%d: exit %d\n%s", op, fp, fpHit(fp), code, out)
			}
			if os.Getenv("DMCONVERT_FP_TRACE") != "" {
				t.Logf("dmconvert %s (dies at %s#%d):\n%s", op, fp, fpHit(fp), out)
			}
			code, rout := cliRun(t, rec, "--journal", j, "--key-file", pwFile)
			done := rec == "resume"
			switch {
			case code != 0 && strings.Contains(rout, "is already done"):
				code, done = 0, true // the failpoint came after the final commit
			case code != 0 && rec == "abort" && strings.Contains(rout, "too late"):
				code, rout = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
				done = true
			}
			t.Logf("dmconvert %s after dying at %s: exit %d\n%s", rec, fp, code, rout)
			acks, _ := w.finish(t)
			if code != 0 {
				t.Fatalf("%s after dying at %s: exit %d", rec, fp, code)
			}
			verifyStack(t, st, state)
			typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", disk)
			typ = strings.TrimSpace(typ)
			switch {
			case op == "decrypt" && done:
				if typ != "LVM2_member" {
					t.Fatalf("after the decrypt and %s the disk is %q, want LVM2_member", rec, typ)
				}
				if out, err := shOK("dmsetup", "info", name); err == nil {
					t.Fatalf("after the decrypt and %s, %s still exists:\n%s", rec, name, out)
				}
			case typ != "crypto_LUKS":
				t.Fatalf("after the %s and %s the disk is %q, want crypto_LUKS", op, rec, typ)
			default:
				if dump := sh(t, "cryptsetup", "luksDump", disk); strings.Contains(dump, "dmconvert") {
					t.Fatalf("after %s the header still carries dmconvert's marks:\n%s", rec, dump)
				}
				nk := saveVolumeKey(t, disk, "/tmp/fp-now.key")
				changed := !bytes.Equal(nk, oldKey)
				if op == "rekey" && done && !changed {
					t.Fatal("the rekey finished, but the disk still has the old key")
				}
				if op == "decrypt" && changed {
					t.Fatal("the aborted decrypt left a disk with another volume key")
				}
			}
			t.Logf("%s/%s: %d acknowledged writes verified; disk is %s", fp, rec, acks, typ)
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
	t.Logf("%s failpoint cases: %d run, %d passed", op, cases, passed)
}

// fpHit picks which hit of a failpoint to die at: per-chunk points die in
// the middle of the run, the others at their first (often only) hit.
func fpHit(name string) int {
	switch name {
	case "intent:before", "intent:after", "load:before", "load:after", "suspend:after",
		"resume:before", "resume:after", "sync:after", "flush:after",
		"commit:before", "commit:after", "rewrite:saved", "rewrite:written":
		return 5
	case "checkpoint:before", "checkpoint:after":
		// The header's checkpoint of a move's chunks comes about once a
		// second (Engine.CheckpointEvery): the second one is mid-run.
		return 2
	case "mark:part-written":
		// A rekey's staged keyslot, then the metadata's first copy; a
		// decrypt's two copies: the second write is inside the mark.
		return 2
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
	st := buildSmallStack(t, "fp", disk, state, 8192, "24m", "4m")
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "vgchange", "-an", st.VG)
	pristine := diskBytes(t, disk)
	man, _ := os.ReadFile(st.file(state, "manifest"))
	cases, passed := 0, 0
	var points []string
	for _, fp := range Failpoints {
		if !rewriteOnly[fp] && !headerGapOnly[fp] && !markOnly[fp] {
			points = append(points, fp)
		}
	}
	// A seeded sample of half the points per recovery in make test (the
	// suite's time budget: each case is a whole encrypt under a writer;
	// the fake-kernel matrices cover every point at many hits);
	// DMCONVERT_FP_N=all runs every point, =n that many.
	all := len(points)
	seed := time.Now().UnixNano()
	if v, err := strconv.ParseInt(os.Getenv("DMCONVERT_FP_SEED"), 10, 64); err == nil {
		seed = v
	}
	n := (all + 2) / 3
	if v := os.Getenv("DMCONVERT_FP_N"); v == "all" {
		n = all
	} else if k, err := strconv.Atoi(v); err == nil && k > 0 {
		n = min(k, all)
	}
	if n < all {
		rng := mrand.New(mrand.NewSource(seed))
		rng.Shuffle(len(points), func(i, j int) { points[i], points[j] = points[j], points[i] })
		points = points[:n]
		sort.Slice(points, func(i, j int) bool { return slices.Index(Failpoints, points[i]) < slices.Index(Failpoints, points[j]) })
	}
	if v := os.Getenv("DMCONVERT_FP_ONLY"); v != "" {
		points = []string{v}
	}
	t.Logf("encrypt failpoints then %s: %d of %d, seed %d (DMCONVERT_FP_SEED to replay, DMCONVERT_FP_N=all for every one)", rec, len(points), all, seed)
	for _, fp := range points {
		{
			cases++
			ok := t.Run(fp, func(t *testing.T) {
				lap := lapTimer(t)
				defer lap("done")
				cleanupGuest(st)
				restoreDisk(t, disk, pristine)
				os.WriteFile(st.file(state, "manifest"), man, 0o644)
				os.Remove(st.file(state, "acks"))
				os.Remove(st.file(state, "journal"))
				sh(t, "vgchange", "-ay", st.VG)
				for i, mp := range st.Mounts {
					sh(t, "mount", "/dev/mapper/"+st.VG+"-"+st.FSLVs[i], mp)
				}
				lap("restored")
				w := startWriter(t, st, state)
				die := func(fp string, hit int, args ...string) {
					code, out := cliRunEnv(t, []string{fmt.Sprintf("DMCONVERT_FAILPOINT=%s:%d", fp, hit)}, args...)
					if code != FailpointExitCode {
						w.finish(t)
						t.Fatalf("dmconvert %s did not stop at failpoint %s#%d: exit %d\n%s", args[0], fp, hit, code, out)
					}
					if os.Getenv("DMCONVERT_FP_TRACE") != "" {
						t.Logf("dmconvert %s (dies at %s#%d):\n%s", args[0], fp, hit, out)
					}
				}
				args := []string{"encrypt", st.Disk, "--batch-mode", "--key-file", pwFile, "--journal", st.file(state, "journal"),
					"--header-size", "4M", "--chunk-size", "4M", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}
				if abortOnly[fp] {
					// Reached only while walking back: stop the run in the
					// middle, then let the abort die there.
					die("commit:after", 5, args...)
					die(fp, 1, "abort", "--journal", st.file(state, "journal"), "--key-file", pwFile)
				} else {
					die(fp, fpHit(fp), args...)
				}
				lap("died")
				code, rout := cliRun(t, rec, "--journal", st.file(state, "journal"), "--key-file", pwFile)
				if code != 0 && strings.Contains(rout, "is already done") {
					// The failpoint came after the final commit.
					code = 0
				}
				acks, _ := w.finish(t)
				lap(rec)
				if os.Getenv("DMCONVERT_FP_TRACE") != "" {
					t.Logf("dmconvert %s:\n%s", rec, rout)
				}
				if code != 0 {
					t.Fatalf("%s after dying at %s: exit %d\n%s", rec, fp, code, rout)
				}
				verifyStack(t, st, state)
				lap("verified")
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
func buildSmallStack(t testing.TB, tag, disk, state string, header uint64, extSize, rawSize string) *stack {
	t.Helper()
	size := diskSectors(t, disk)
	pvSize := size - 2*header
	vg := "vg" + tag
	sh(t, "pvcreate", "-y", "--setphysicalvolumesize", fmt.Sprintf("%ds", pvSize), disk)
	sh(t, "vgcreate", "-y", vg, disk)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", extSize, vg)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", rawSize, vg)
	return extRawStack(t, tag, disk, state, vg, pvSize, "-E", "lazy_itable_init=0,lazy_journal_init=0")
}

// lapTimer logs the time since its last call under a label (where a
// guest case spends its time).
func lapTimer(t testing.TB) func(string) {
	t0 := time.Now()
	return func(label string) {
		t.Logf("%s after %.1fs", label, time.Since(t0).Seconds())
		t0 = time.Now()
	}
}
