package convert

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	mrand "math/rand"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
	"github.com/dmconvert/dmconvert/testvm/logwrites"
)

// Crashes that lose the disk's volatile write cache, on the real kernel.
//
// A whole `dmconvert encrypt` (TestGuestLogWritesEncrypt: a plain PV) or
// `dmconvert rekey` (TestGuestLogWritesRekey: a LUKS2 volume with a 4 MiB
// header, opened, a PV on it) is recorded through dm-log-writes, with a
// mounted ext4 LV and a raw LV on the PV: the disk D and the ext4 J
// holding the journal are two dm-linear slices of one log-writes device
// L, so one log orders the writes of both. The log holds a write back
// until the flush that makes it durable, so a prefix of the log that ends
// at a FLUSH or FUA entry is the disk as a power cut at that instant
// leaves it, cache lost. Every such prefix after the "start" mark (and a
// seeded sample of prefixes between flushes: the cache partly written
// back) can be replayed onto a copy; there, what a boot does (pvscan,
// vgchange -ay, cryptsetup open) must not map the disk wrongly: LVM may
// activate only a plain PV, stock cryptsetup may open only a header
// without dmconvert's mark, and what they map must hold every file and
// the raw LV's pattern. Then `dmconvert resume` (or `abort`, every third
// point that needs one) must finish, from the state that boot left (a
// rekeyed volume has a crypttab entry: when cryptsetup opens it, it stays
// open with its LVs active); the LVs must be on the mapping (on D after
// an encrypt's abort), no helper left, the files and the pattern intact,
// and again cold through stock cryptsetup. After a rekey the old volume
// key must open nothing; before it or after its abort the volume key is
// the old one.
//
// Each run has some 70 flush points that change the disk; by default
// every one is replayed (5-40 s each under emulation, most of it the
// resume and the checks: the rekey's 76 points took 7 minutes on a quiet
// host, 19 minutes with its two cores busy with other VMs). DMCONVERT_LW_POINTS=n replays n of
// them, one from each stretch of the run, chosen with a seed that is
// printed; DMCONVERT_LW_SEED=s replays a sample, DMCONVERT_LW_SAMPLES
// sets how many in-between points (default 4). TestVMLogWritesEncrypt and
// TestVMLogWritesRekey boot one VM each, in parallel (-run
// '^TestVMLogWritesRekey$', or DMCONVERT_VM_RUN='^TestGuestLogWritesRekey$',
// boots one). A guest test
// stops replaying when its budget runs out: by default what go test's
// -timeout leaves (10m unless set; give -timeout 40m), or
// DMCONVERT_LW_BUDGET (a Go duration, "0" for none). Points not replayed
// fail the test.

const (
	lwDiskBytes    = 20 << 20 // D: a 12 MiB PV, then two header sizes (encrypt); a 4 MiB LUKS2 header, then 16 MiB of data (rekey)
	lwJournalBytes = 16 << 20 // J, after D on the same data disk
	lwDataBytes    = lwDiskBytes + lwJournalBytes
	lwLogBytes     = 512 << 20
	lwHeader       = 4 << 20

	lwLog      = "lwlog" // the log-writes device L
	lwDisk     = "lwd"   // D: what is converted
	lwJ        = "lwj"   // J: the journal's file system
	lwMapping  = lwDisk + "_crypt"
	lwTag      = "lw"
	lwVG       = "vg" + lwTag
	lwExtMount = "/mnt/" + lwTag + "-ext"
	lwJMount   = "/mnt/lwj"
	lwJournal  = lwJMount + "/lw.journal"
	lwScratch  = "/tmp/lw-scratch.img"
	lwLogFile  = "/tmp/lw-log.img"
	lwOldKey   = "/tmp/lw-old.key" // the rekey's old volume key
	lwRawBlock = 4096
)

var lwKDF = []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}

// lwOp is what the recorded operations do differently.
type lwOp struct {
	name string // the dmconvert command recorded: "encrypt" or "rekey"
	// luks: D is a LUKS volume before the run, opened as lwMapping with
	// the PV on the mapping (rekey), and after an abort; otherwise a plain
	// PV (encrypt). A LUKS volume has a crypttab entry: a boot that can
	// open it leaves it open, the LVs active, and resume starts from there.
	luks bool
	// prepare builds the live stack on D (a slice of L).
	prepare func(t testing.TB) (*stack, *lwData)
	// args: the recorded command line.
	args func(st *stack) []string
	// points is how many flush points make test replays (0: all; the
	// suite's time budget); DMCONVERT_LW_POINTS=all|n overrides.
	points int
}

var lwEncrypt = &lwOp{
	name: "encrypt",
	// A seeded sample of 12 flush points in make test, spread over the
	// run (every one took 360 s of QEMU CPU on 2026-11-23's host;
	// DMCONVERT_LW_POINTS=all).
	points:  12,
	prepare: lwPrepareEncrypt,
	args: func(st *stack) []string {
		return append([]string{"encrypt", st.Disk, "--batch-mode", "--json", "--key-file", pwFile, "--journal", lwJournal,
			"--header-size", "4M", "--chunk-size", "4M"}, lwKDF...)
	},
}

var lwRekey = &lwOp{
	name: "rekey",
	// A seeded sample of 10 flush points in make test (every one: 7 min
	// of a VM on a quiet host; DMCONVERT_LW_POINTS=all).
	points:  10,
	luks:    true,
	prepare: lwPrepareRekey,
	args: func(*stack) []string {
		// The gap is what the 4 MiB header's keyslots area leaves once the
		// new key is staged: 3.5 MiB, so 5 chunks.
		return []string{"rekey", lwMapping, "--batch-mode", "--json", "--key-file", pwFile, "--journal", lwJournal, "--chunk-size", "4M"}
	},
}

// vmLogWrites boots the VM of one recorded operation (TestVMLogWrites*:
// "Encrypt" or "Rekey"; they run in parallel), with one virtio disk, vda:
// D then J. The log lives on a loop device over a tmpfs file (in the first
// runs, a second virtio disk as the log now and then failed a large merged
// log write with an I/O error under host load, which disables logging),
// and so do the replays.
func vmLogWrites(t *testing.T, name string) {
	testvm.RequireVM(t)
	vmParallel(t)
	guest := "TestGuestLogWrites" + name
	if r := os.Getenv(testvm.EnvRun); r != "" {
		only, err := regexp.Compile(r)
		if err != nil {
			t.Fatalf("%s: %v", testvm.EnvRun, err)
		}
		if !only.MatchString(guest) {
			t.Skipf("%s=%s does not ask for %s: its VM is not booted", testvm.EnvRun, r, guest)
		}
	}
	bin := testvm.BuildStatic(t, "./cmd/dmconvert")
	env := map[string]string{}
	for _, k := range []string{"DMCONVERT_LW_SEED", "DMCONVERT_LW_SAMPLES", "DMCONVERT_LW_POINTS", "DMCONVERT_LW_BUDGET"} {
		if v := os.Getenv(k); v != "" {
			env[k] = v
		}
	}
	timeout := 60 * time.Minute
	if dl, ok := t.Deadline(); ok {
		// Stop replaying in time to report, rather than be killed by
		// go test's -timeout: the guest's clock starts after the boot.
		left := time.Until(dl)
		timeout = left - 30*time.Second
		if env["DMCONVERT_LW_BUDGET"] == "" {
			env["DMCONVERT_LW_BUDGET"] = max(left-100*time.Second, time.Minute).Round(time.Second).String()
		}
	}
	start := time.Now()
	testvm.RunTestsInGuest(t, testvm.Options{
		Disks:    []testvm.Disk{{Size: lwDataBytes}},
		Run:      "^" + guest + "$",
		FixedRun: true, // each VM runs its own guest test
		Files:    map[string]string{"dmconvert": bin},
		Env:      env,
		MemMiB:   3072,
		Timeout:  timeout,
	})
	t.Logf("dm-log-writes test: %v from build to shutdown", time.Since(start).Round(time.Second))
}

// lwFilter makes LVM see only D and the final mapping: the data disk, L
// and the loop device under the replays carry the same PV label.
func lwFilter(t *testing.T) { lvmSeesOnly(t, lwDisk, lwMapping) }

// lvmSeesOnly makes LVM see only the named device-mapper devices, until
// the test ends.
func lvmSeesOnly(t *testing.T, names ...string) {
	const conf = "/etc/lvm/lvm.conf"
	orig, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	f := `[ `
	for _, n := range names {
		f += `"a|^/dev/mapper/` + n + `$|", `
	}
	f += `"r|.*|" ]`
	var out []string
	replaced := false
	for _, l := range strings.Split(string(orig), "\n") {
		if k := strings.TrimSpace(l); strings.HasPrefix(k, "filter =") || strings.HasPrefix(k, "global_filter =") {
			if !replaced {
				out = append(out, "\tfilter = "+f, "\tglobal_filter = "+f)
				replaced = true
			}
			continue
		}
		out = append(out, l)
	}
	if !replaced {
		t.Fatalf("%s has no devices/filter line to replace", conf)
	}
	if err := os.WriteFile(conf, []byte(strings.Join(out, "\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.WriteFile(conf, orig, 0o644) })
}

func lwSectors(b int64) string { return strconv.FormatInt(b/512, 10) }

// lwSlices creates D and J as dm-linear slices of dev.
func lwSlices(t testing.TB, dev string) {
	t.Helper()
	sh(t, "dmsetup", "create", lwDisk, "--table", "0 "+lwSectors(lwDiskBytes)+" linear "+dev+" 0")
	sh(t, "dmsetup", "create", lwJ, "--table", "0 "+lwSectors(lwJournalBytes)+" linear "+dev+" "+lwSectors(lwDiskBytes))
}

// lwData is what the stack must hold: the files' checksums, the ext4
// LV's size; the raw LV holds lwRawBlockData.
type lwData struct {
	files  map[string]string // path under the mount point -> sha256
	extLen int64
}

// lwRawBlockData is block i of the raw LV's pattern.
func lwRawBlockData(i int) []byte {
	sum := sha256.Sum256([]byte(fmt.Sprintf("dmconvert log-writes raw block %d", i)))
	return bytes.Repeat(sum[:], lwRawBlock/len(sum))
}

func devLen(t testing.TB, dev string) int64 {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := f.Seek(0, 2)
	if err != nil {
		t.Fatalf("size of %s: %v", dev, err)
	}
	return n
}

// lwPrepareEncrypt: a plain PV on D leaving two header sizes at the end.
func lwPrepareEncrypt(t testing.TB) (*stack, *lwData) {
	t.Helper()
	pvSize := uint64(lwDiskBytes-2*lwHeader) / 512
	st, data := lwBuild(t, "/dev/mapper/"+lwDisk, "--setphysicalvolumesize", fmt.Sprintf("%ds", pvSize))
	st.PVSize = pvSize
	return st, data
}

// lwPrepareRekey: a LUKS2 volume on D with a 4 MiB header (its keyslots
// area fills it: room for the staged key and a 3.5 MiB gap), opened as
// lwMapping, a PV filling the mapping, as installers make it. The old
// volume key goes to lwOldKey.
func lwPrepareRekey(t testing.TB) (*stack, *lwData) {
	t.Helper()
	disk := "/dev/mapper/" + lwDisk
	args := []string{"luksFormat", "-q", "--type", "luks2", "--sector-size", "512", "--offset", lwSectors(lwHeader)}
	sh(t, "cryptsetup", append(append(args, lwKDF...), "--key-file", pwFile, disk)...)
	saveVolumeKey(t, disk, lwOldKey)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, lwMapping)
	st, data := lwBuild(t, "/dev/mapper/"+lwMapping)
	st.Disk = disk
	return st, data
}

// lwBuild makes the small live stack: a PV on pv (created with the extra
// pvcreate arguments), an ext4 LV with files (mounted) and a raw LV with
// a pattern.
func lwBuild(t testing.TB, pv string, pvcreate ...string) (*stack, *lwData) {
	t.Helper()
	sh(t, "pvcreate", append(append([]string{"-y"}, pvcreate...), pv)...)
	sh(t, "vgcreate", "-y", "-s", "1m", lwVG, pv)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", "6m", lwVG)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "4m", lwVG)
	sh(t, "vgchange", "-ay", lwVG)
	st := &stack{Tag: lwTag, Disk: pv, VG: lwVG, RawLV: "/dev/mapper/" + lwVG + "-raw", Mounts: []string{lwExtMount}}
	ext := "/dev/mapper/" + lwVG + "-ext"
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", ext)
	os.MkdirAll(lwExtMount, 0o755)
	sh(t, "mount", "-o", "noatime", ext, lwExtMount)
	data := &lwData{files: map[string]string{}, extLen: devLen(t, ext)}
	os.MkdirAll(filepath.Join(lwExtMount, "data"), 0o755)
	for i := 0; i < 10; i++ {
		b := make([]byte, 24<<10+i*20<<10+i*512)
		rand.Read(b)
		name := fmt.Sprintf("data/f%d", i)
		if err := os.WriteFile(filepath.Join(lwExtMount, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		data.files[name] = hex.EncodeToString(sum[:])
	}
	f, err := os.OpenFile(st.RawLV, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < int(devLen(t, st.RawLV)/lwRawBlock); i++ {
		if _, err := f.WriteAt(lwRawBlockData(i), int64(i)*lwRawBlock); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	sh(t, "sync")
	return st, data
}

// lwVerify checks the active LVs: the ext4 LV's size, every file
// (mounting it first, as a boot would: the mount replays the file
// system's journal, which a crash may have left full), fsck clean after
// the unmount, the raw LV's pattern. It leaves nothing mounted.
func lwVerify(t testing.TB, data *lwData) {
	t.Helper()
	ext := "/dev/mapper/" + lwVG + "-ext"
	if n := devLen(t, ext); n != data.extLen {
		t.Fatalf("%s is %d bytes, was %d", ext, n, data.extLen)
	}
	sh(t, "mount", "-o", "noatime", ext, lwExtMount)
	for name, want := range data.files {
		b, err := os.ReadFile(filepath.Join(lwExtMount, name))
		if err != nil {
			sh(t, "umount", lwExtMount)
			t.Fatalf("file %s: %v", name, err)
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != want {
			sh(t, "umount", lwExtMount)
			t.Fatalf("file %s changed", name)
		}
	}
	sh(t, "umount", lwExtMount)
	if out, err := shOK("e2fsck", "-f", "-n", ext); err != nil {
		t.Fatalf("e2fsck -f -n %s: %v\n%s", ext, err, out)
	}
	raw, err := os.ReadFile("/dev/mapper/" + lwVG + "-raw")
	if err != nil {
		t.Fatal(err)
	}
	var bad []int
	for i := 0; (i+1)*lwRawBlock <= len(raw); i++ {
		if !bytes.Equal(raw[i*lwRawBlock:(i+1)*lwRawBlock], lwRawBlockData(i)) {
			bad = append(bad, i)
		}
	}
	if len(bad) > 0 {
		t.Fatalf("raw LV: %d of %d 4 KiB blocks differ from the pattern (first: %v)", len(bad), len(raw)/lwRawBlock, bad[:min(len(bad), 8)])
	}
}

// lwStatus is what `dmconvert status --json` says about the journal.
type lwStatus struct {
	Exists    bool
	Err       string
	Status    string
	Aborting  bool
	Phase     int
	Phases    int
	PhaseName string
	Boundary  uint64
}

func (s lwStatus) String() string {
	if !s.Exists {
		return "no run (" + s.Err + ")"
	}
	a := ""
	if s.Aborting {
		a = " aborting"
	}
	return fmt.Sprintf("%s%s, phase %d/%d %q, boundary %d", s.Status, a, s.Phase, s.Phases, s.PhaseName, s.Boundary)
}

// lwReadStatus reads the journal the way `dmconvert status` does (in
// process: a dmconvert process costs a second under emulation).
func lwReadStatus() lwStatus {
	ri, err := InspectJournal(lwJournal, 10*time.Second)
	if err != nil {
		return lwStatus{Err: err.Error()}
	}
	return lwStatus{Exists: true, Status: ri.Status, Aborting: ri.Aborting, Phase: ri.Phase, Phases: ri.Phases, PhaseName: ri.PhaseName, Boundary: uint64(ri.Boundary)}
}

func lwRank(name string) int {
	switch {
	case strings.HasPrefix(name, lwVG+"-"):
		return 0
	case name == lwMapping:
		return 1
	case strings.HasPrefix(name, "dmconvert-"):
		return 2
	}
	return 3
}

// lwTeardown removes everything a replay point set up, as a power cut
// would, and forgets LVM's runtime state (a reboot starts without it).
func lwTeardown(loop string) error {
	for _, mp := range []string{lwExtMount, lwJMount} {
		if isMounted(mp) {
			if out, err := shOK("umount", mp); err != nil {
				return fmt.Errorf("umount %s: %v: %s", mp, err, out)
			}
		}
	}
	for pass := 0; ; pass++ {
		out, _ := shOK("dmsetup", "info", "-c", "--noheadings", "--separator", " ", "-o", "name,suspended")
		var left, suspended []string
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) < 2 || (f[0] != lwDisk && f[0] != lwJ && lwRank(f[0]) == 3) {
				continue
			}
			left = append(left, f[0])
			if f[1] == "Suspended" {
				suspended = append(suspended, f[0])
			}
		}
		if len(left) == 0 {
			break
		}
		if pass == 3 {
			return fmt.Errorf("device-mapper devices left: %v", left)
		}
		if len(suspended) > 0 {
			shOK("dmsetup", append([]string{"resume"}, suspended...)...)
		}
		// Top down: LVs, the final mapping, helpers, then D and J.
		sort.SliceStable(left, func(i, j int) bool { return lwRank(left[i]) < lwRank(left[j]) })
		shOK("dmsetup", append([]string{"remove"}, left...)...)
	}
	if loop != "" {
		if out, err := shOK("losetup", "-d", loop); err != nil {
			return fmt.Errorf("losetup -d %s: %v: %s", loop, err, out)
		}
	}
	for _, d := range []string{"/run/lvm/pvs_online", "/run/lvm/vgs_online", "/run/lvm/pvs_lookup"} {
		os.RemoveAll(d)
	}
	return nil
}

// lwRecording is what the recorded run left.
type lwRecording struct {
	st     *stack
	data   *lwData
	oldKey []byte // the volume key before a rekey
	final  []byte // the data disk's content after the run
	took   time.Duration
}

// lwRecord builds the stack on D over L, marks the log and runs the whole
// operation, then takes everything down (L last, which writes the log's
// end mark).
func lwRecord(t *testing.T, op *lwOp, disk string) *lwRecording {
	if err := os.WriteFile(lwLogFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(lwLogFile, lwLogBytes); err != nil {
		t.Fatal(err)
	}
	logdev := strings.TrimSpace(sh(t, "losetup", "-f", "--show", lwLogFile))
	sh(t, "dmsetup", "create", lwLog, "--table", "0 "+lwSectors(lwDataBytes)+" log-writes "+disk+" "+logdev)
	lwSlices(t, "/dev/mapper/"+lwLog)
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", "/dev/mapper/"+lwJ)
	os.MkdirAll(lwJMount, 0o755)
	sh(t, "mount", "/dev/mapper/"+lwJ, lwJMount)
	st, data := op.prepare(t)
	rec := &lwRecording{st: st, data: data}
	if op.luks {
		b, err := os.ReadFile(lwOldKey)
		if err != nil {
			t.Fatal(err)
		}
		rec.oldKey = b
	}
	sh(t, "dmsetup", "message", lwLog, "0", "mark", "start")
	t0 := time.Now()
	code, out := cliRun(t, op.args(st)...)
	rec.took = time.Since(t0)
	requireExit(t, "the recorded "+op.name, code, 0, out)
	sh(t, "dmsetup", "message", lwLog, "0", "mark", "done")
	for _, lv := range []string{"ext", "raw"} {
		if deps := sh(t, "dmsetup", "deps", "-o", "devname", lwVG+"-"+lv); !strings.Contains(deps, "("+lwMapping+")") {
			t.Fatalf("after the recorded run %s-%s does not map %s: %s", lwVG, lv, lwMapping, deps)
		}
	}
	sh(t, "umount", lwExtMount)
	lwVerify(t, data)
	if err := lwTeardown(""); err != nil {
		t.Fatal(err)
	}
	status := strings.TrimSpace(sh(t, "dmsetup", "status", lwLog))
	sh(t, "dmsetup", "remove", lwLog)
	t.Logf("recorded %s took %v; log-writes status before removal: %s", op.name, rec.took.Round(time.Millisecond), status)
	if strings.Contains(status, "logging_disabled") {
		t.Fatalf("dm-log-writes disabled logging during the run (a failed log write, or the log device is full): the log is incomplete")
	}
	sh(t, "losetup", "-d", logdev)
	sh(t, "blockdev", "--flushbufs", disk)
	final, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	rec.final = final
	return rec
}

// lwPoint is one replayed crash point.
type lwPoint struct {
	entry     int
	kind      string // "flush", "between", "start", "done"
	cmd       string // "resume" or "abort"; "" when there was nothing to run
	status    lwStatus
	ident     Identity
	stockOpen bool // stock cryptsetup opened the disk (its data was then verified)
	// sameDiskAs: D is byte for byte D at that earlier point, whose
	// boot checks stand for this one's (-1: checked here).
	sameDiskAs int
	result     string
	took       time.Duration
	stages     []string
}

func (p *lwPoint) String() string {
	what := ""
	if p.cmd != "" {
		what = p.cmd + " -> "
	}
	boot := ""
	if p.sameDiskAs >= 0 {
		boot = fmt.Sprintf(" (D as at entry %d)", p.sameDiskAs)
	}
	return fmt.Sprintf("entry %d (%s): disk shows %v%s; journal: %v; %s%s in %v (%s)",
		p.entry, p.kind, p.ident, boot, p.status, what, p.result, p.took.Round(time.Millisecond), strings.Join(p.stages, ", "))
}

// lwChecker replays points. It remembers the versions of D (the last log
// entry that wrote to D) that a point's boot checks already examined:
// the boot's tools see only D, so the same bytes give the same answer,
// and a later point with the same D (most points differ from the one
// before only in the journal's file system) just brings the stack up as
// that boot did.
type lwChecker struct {
	op       *lwOp
	rec      *lwRecording
	booted   map[int]*lwPoint
	actioned int // points that needed a resume or an abort
}

// check materialises the replayed image on a loop device, looks at it
// the way a boot does, then resumes or aborts and verifies, cold.
func (c *lwChecker) check(t *testing.T, img logwrites.Image, dVersion int, p *lwPoint) {
	st, data := c.rec.st, c.rec.data
	t0 := time.Now()
	stage := func(name string) {
		p.stages = append(p.stages, fmt.Sprintf("%s %.1fs", name, time.Since(t0).Seconds()))
		t0 = time.Now()
	}
	if err := os.WriteFile(lwScratch, img, 0o600); err != nil {
		t.Fatal(err)
	}
	loop := strings.TrimSpace(sh(t, "losetup", "-f", "--show", lwScratch))
	defer func() {
		if err := lwTeardown(loop); err != nil {
			t.Fatalf("tearing down the point: %v", err)
		}
		stage("teardown")
	}()
	lwSlices(t, loop)
	sh(t, "mount", "/dev/mapper/"+lwJ, lwJMount)
	p.ident = Identify(img[:4096])
	p.status = lwReadStatus()
	stage("setup")

	// What a boot does before anyone runs dmconvert.
	prev := c.booted[dVersion]
	if prev != nil {
		p.sameDiskAs, p.stockOpen = prev.entry, prev.stockOpen
	} else {
		c.bootChecks(t, p)
		c.booted[dVersion] = p // only once they passed
	}
	stage("boot checks")
	// The key checks want nothing mapped: close what this point's boot
	// checks opened (a point with a known D opened nothing yet).
	closeOpened := func() {
		if prev == nil {
			c.closeMapping(t)
		}
	}

	switch {
	case !p.status.Exists:
		// The run never recorded anything: the disk must be untouched.
		if !c.op.luks {
			if p.ident != IdentityLVM {
				t.Fatalf("no run in the journal (%s) but the disk shows %v", p.status.Err, p.ident)
			}
			p.result = "no run recorded: plain PV verified"
			return
		}
		if !p.stockOpen {
			t.Fatalf("no run in the journal (%s) but stock cryptsetup does not open the disk (it shows %v)", p.status.Err, p.ident)
		}
		closeOpened()
		c.checkKey(t, false)
		p.result = "no run recorded: opened with stock cryptsetup, verified, the old volume key"
		return
	case p.status.Status == "done":
		if !p.stockOpen {
			t.Fatalf("the journal says done but stock cryptsetup does not open the disk (it shows %v)", p.ident)
		}
		if !c.op.luks {
			p.result = "already done: opened with stock cryptsetup, verified"
			return
		}
		closeOpened()
		c.checkKey(t, true)
		p.result = "already done: opened with stock cryptsetup, verified, the old volume key refused"
		return
	}
	if prev != nil {
		// The same D as a point already checked: bring the stack up as
		// that boot left it, the state resume starts from.
		switch {
		case p.ident == IdentityLVM:
			// The boot activates the VG; on any other D it found nothing
			// to activate.
			shOK("vgchange", "-ay", lwVG)
			stage("boot")
		case p.stockOpen && c.op.luks:
			// The boot opened the volume by its crypttab entry.
			sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, lwMapping)
			sh(t, "vgchange", "-ay", lwVG)
			stage("boot")
		}
	}
	c.actioned++
	p.cmd = "resume"
	if c.actioned%3 == 0 {
		p.cmd = "abort"
	}
	code, out := cliRun(t, p.cmd, "--journal", lwJournal, "--device", st.Disk, "--key-file", pwFile)
	if code != 0 && p.cmd == "abort" && strings.Contains(out, "too late") {
		// Past the point of no return an abort is refused (the header
		// is being overwritten): finishing is what is left.
		stage("abort refused")
		p.cmd = "abort too late, resume"
		code, out = cliRun(t, "resume", "--journal", lwJournal, "--device", st.Disk, "--key-file", pwFile)
	}
	if code != 0 {
		t.Fatalf("dmconvert %s at entry %d (disk shows %v; journal: %v): exit %d:\n%s", p.cmd, p.entry, p.ident, p.status, code, out)
	}
	stage(p.cmd)
	aborted := p.cmd == "abort"
	// Live: the LVs are on the mapping the run ends with, no helper is
	// left; then cold, as the next boot sees the disk.
	want, wantID := lwMapping, IdentityLUKS
	if aborted && !c.op.luks {
		want, wantID = lwDisk, IdentityLVM
	}
	deps := sh(t, "dmsetup", "deps", "-o", "devname")
	for _, lv := range []string{"ext", "raw"} {
		found := false
		for _, l := range strings.Split(deps, "\n") {
			if strings.HasPrefix(l, lwVG+"-"+lv+":") && strings.Contains(l, "("+want+")") {
				found = true
			}
		}
		if !found {
			t.Fatalf("after %s %s-%s does not map %s:\n%s", p.cmd, lwVG, lv, want, deps)
		}
	}
	if strings.Contains(deps, "dmconvert-") || (want == lwDisk && strings.Contains(deps, lwMapping+":")) {
		t.Fatalf("devices left after %s:\n%s", p.cmd, deps)
	}
	remove := []string{"remove", lwVG + "-ext", lwVG + "-raw"}
	if want == lwMapping {
		remove = append(remove, lwMapping)
	}
	sh(t, "dmsetup", remove...)
	first := make([]byte, 4096)
	f, err := os.Open(st.Disk)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.ReadAt(first, 0)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if id := Identify(first); id != wantID {
		t.Fatalf("after %s the disk shows %v, want %v", p.cmd, id, wantID)
	}
	if want == lwMapping {
		sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, lwMapping)
	}
	sh(t, "vgchange", "-ay", lwVG)
	lwVerify(t, data)
	stage("cold verify")
	switch {
	case !c.op.luks && aborted:
		p.result = "aborted: plain PV verified cold"
	case !c.op.luks:
		p.result = "resumed: verified cold through stock cryptsetup"
	case aborted:
		c.closeMapping(t)
		c.checkKey(t, false)
		p.result = "aborted: verified cold through stock cryptsetup, the old volume key"
	default:
		c.closeMapping(t)
		c.checkKey(t, true)
		p.result = "resumed: verified cold through stock cryptsetup, the old volume key refused"
	}
}

// closeMapping takes down the LVs and the mapping a cryptsetup open made.
func (c *lwChecker) closeMapping(t *testing.T) {
	t.Helper()
	sh(t, "dmsetup", "remove", lwVG+"-ext", lwVG+"-raw", lwMapping)
}

// checkKey checks the volume key of a LUKS D with nothing mapped: after
// a rekey the old key opens nothing; otherwise the disk still has the
// old key, no dmconvert mark and no staged keyslot.
func (c *lwChecker) checkKey(t *testing.T, rekeyed bool) {
	t.Helper()
	disk := c.rec.st.Disk
	if rekeyed {
		checkRekeyed(t, disk, c.rec.oldKey, lwOldKey)
		return
	}
	if out, err := shOK("cryptsetup", "open", "--test-passphrase", "--volume-key-file", lwOldKey, disk); err != nil {
		t.Fatalf("the old volume key does not open %s: %v\n%s", disk, err, out)
	}
	if dump := sh(t, "cryptsetup", "luksDump", disk); strings.Contains(dump, "dmconvert") || strings.Contains(dump, "unbound") {
		t.Fatalf("the header of %s carries dmconvert's marks or a staged keyslot:\n%s", disk, dump)
	}
}

// bootChecks: pvscan's autoactivation, vgchange -ay, and a cryptsetup
// open by a crypttab entry someone may already have. Only a plain PV may
// be activated; only a LUKS header without dmconvert's mark may be opened
// (a finished encrypt, a rekey not started or finished); and what they
// map must hold every file and the raw pattern.
func (c *lwChecker) bootChecks(t *testing.T, p *lwPoint) {
	shOK("pvscan", "--cache", "-aay")
	shOK("vgchange", "-ay", lwVG)
	if p.ident == IdentityLVM {
		if c.op.luks {
			t.Fatalf("the disk of a %s carries an LVM label", c.op.name)
		}
		// Still a plain PV: what LVM activates must be complete and
		// current (design.md section 3).
		if _, err := os.Stat("/dev/mapper/" + lwVG + "-ext"); err != nil {
			t.Fatalf("the disk carries an LVM label but LVM activated no LV of %s", lwVG)
		}
		lwVerify(t, c.rec.data)
		return
	}
	if out, _ := shOK("dmsetup", "ls"); strings.Contains(out, lwVG+"-") {
		t.Fatalf("LVM activated LVs of the disk, which shows %v:\n%s", p.ident, out)
	}
	if _, err := shOK("cryptsetup", "open", "--key-file", pwFile, c.rec.st.Disk, lwMapping); err == nil {
		// Stock tools open only a header dmconvert has not marked (the
		// LUKS2 requirement): then it must hold everything.
		p.stockOpen = true
		sh(t, "vgchange", "-ay", lwVG)
		lwVerify(t, c.rec.data)
		if !c.op.luks {
			// The new LUKS volume has no crypttab entry yet.
			sh(t, "dmsetup", "remove", lwVG+"-ext", lwVG+"-raw", lwMapping)
		}
	}
}

func lwEnvInt(name string, def int64) int64 {
	if v, err := strconv.ParseInt(os.Getenv(name), 10, 64); err == nil {
		return v
	}
	return def
}

// TestGuestLogWritesEncrypt records an encryption through dm-log-writes
// and replays its flush points (see the top of this file).
func TestGuestLogWritesEncrypt(t *testing.T) { lwRun(t, lwEncrypt) }

// TestGuestLogWritesRekey records a rekey of a LUKS2 volume through
// dm-log-writes and replays its flush points (see the top of this file).
func TestGuestLogWritesRekey(t *testing.T) { lwRun(t, lwRekey) }

// lwBudget is the replays' time budget: DMCONVERT_LW_BUDGET (0: none).
func lwBudget(t *testing.T) time.Duration {
	v := os.Getenv("DMCONVERT_LW_BUDGET")
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		t.Fatalf("DMCONVERT_LW_BUDGET: %v", err)
	}
	return d
}

// lwOpenLog reads the recorded log's entries, finds the run between the
// start and done marks and logs what it holds.
func lwOpenLog(t *testing.T, lf *os.File) (l *logwrites.Log, entries []logwrites.Entry, start, done int) {
	l, err := logwrites.Open(lf, lwLogBytes)
	if err != nil {
		t.Fatal(err)
	}
	entries, err = l.Entries()
	if err != nil {
		t.Fatal(err)
	}
	start = logwrites.FindMark(entries, 0, "start")
	done = logwrites.FindMark(entries, max(start, 0), "done")
	if start < 0 || done < 0 {
		t.Fatalf("the log (%d entries) lacks the start or done mark", len(entries))
	}
	var nFlush, nFUA, nWrites, nDiscard, nMeta int
	var onD, onJ uint64
	for _, e := range entries[start:done] {
		switch {
		case e.Flags&logwrites.FlagDiscard != 0:
			nDiscard++
		case e.Writes():
			nWrites++
			if n := e.Sectors * uint64(l.SectorSize); e.Sector*uint64(l.SectorSize) < lwDiskBytes {
				onD += n
			} else {
				onJ += n
			}
		}
		if e.Flags&logwrites.FlagFlush != 0 {
			nFlush++
		}
		if e.Flags&logwrites.FlagFUA != 0 {
			nFUA++
		}
		if e.Flags&logwrites.FlagMetadata != 0 {
			nMeta++
		}
	}
	t.Logf("log: %d entries, sector size %d; the run (entries %d..%d): %d writes (%.1f MiB on D, %.1f MiB on J), %d FLUSH, %d FUA, %d discards, %d REQ_META",
		len(entries), l.SectorSize, start, done, nWrites, float64(onD)/(1<<20), float64(onJ)/(1<<20), nFlush, nFUA, nDiscard, nMeta)
	return l, entries, start, done
}

// lwPoints chooses the points: the start mark (nothing ran), the
// FLUSH/FUA points of the run that change the disk (all, or a seeded
// sample of DMCONVERT_LW_POINTS spread over the run), a seeded sample
// between them, and the done mark. It returns them in log order with
// their kinds, and the distinct flush points.
func lwPoints(t *testing.T, op *lwOp, entries []logwrites.Entry, start, done int, budget time.Duration) (order []int, kind map[int]string, distinct []int) {
	seed := lwEnvInt("DMCONVERT_LW_SEED", time.Now().UnixNano())
	samples := int(lwEnvInt("DMCONVERT_LW_SAMPLES", 4))
	flushes := logwrites.FlushPoints(entries, start+1, done)
	distinct = logwrites.DistinctFlushPoints(entries, start+1, done)
	// The operation's default (every flush point, or a seeded sample
	// spread over the run); DMCONVERT_LW_POINTS=all or =n overrides.
	nflush := len(distinct)
	if op.points > 0 {
		nflush = min(op.points, nflush)
	}
	if v := os.Getenv("DMCONVERT_LW_POINTS"); v == "all" {
		nflush = len(distinct)
	} else if v != "" {
		nflush = int(lwEnvInt("DMCONVERT_LW_POINTS", int64(len(distinct))))
	}
	rng := mrand.New(mrand.NewSource(seed))
	chosen := logwrites.Spread(distinct, nflush, rng.Intn)
	t.Logf("%d FLUSH/FUA entries in the run, %d of them change the disk; replaying %d of those (DMCONVERT_LW_POINTS=all for every one, =n for a sample) and %d points between flushes; seed %d (DMCONVERT_LW_SEED=%d to replay); budget %v",
		len(flushes), len(distinct), len(chosen), samples, seed, seed, budget)
	kind = map[int]string{start: "start", done: "done"}
	for _, i := range chosen {
		kind[i] = "flush"
	}
	for _, i := range logwrites.SamplePoints(entries, start+1, done, samples, rng.Intn) {
		kind[i] = "between"
	}
	for i := range kind {
		order = append(order, i)
	}
	sort.Ints(order)
	return order, kind, distinct
}

// lwTally counts what the replayed points found.
type lwTally struct {
	points   []*lwPoint
	counts   map[string]int
	phases   map[string]int
	failures []string
	dup      int // chosen flush points whose disk equals the previous point's
	skipped  int // points not replayed (budget, failures)
}

func (s *lwTally) add(p *lwPoint) {
	s.points = append(s.points, p)
	s.counts[p.kind+" points"]++
	s.counts[strings.SplitN(p.result, ":", 2)[0]]++
	if p.stockOpen {
		s.counts["opened by stock cryptsetup before resume"]++
	}
	if p.sameDiskAs < 0 {
		s.counts["boot checks run"]++
	}
	ph := "no run"
	if p.status.Exists {
		ph = fmt.Sprintf("%d %s", p.status.Phase, p.status.PhaseName)
		if p.status.Status == "done" {
			ph = "done"
		}
	}
	s.phases[ph+"/"+p.cmd]++
}

func lwSummary(m map[string]int) string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out []string
	for _, k := range keys {
		out = append(out, fmt.Sprintf("%s: %d", k, m[k]))
	}
	return strings.Join(out, ", ")
}

// lwReplay replays the points in order onto img, each as a subtest,
// until 3 failed or the budget ran out.
func lwReplay(t *testing.T, c *lwChecker, l *logwrites.Log, entries []logwrites.Entry, rp *logwrites.Replayer, img logwrites.Image,
	order []int, kind map[int]string, began time.Time, budget time.Duration) *lwTally {
	s := &lwTally{counts: map[string]int{}, phases: map[string]int{}}
	last, dVersion := -1, -1
	for _, i := range order {
		if len(s.failures) >= 3 || (budget > 0 && time.Since(began) > budget) {
			s.skipped++
			continue
		}
		// A point whose disk equals the previous point's (no write in
		// between) is the same crash: replay it once.
		same := last >= 0
		for j := last + 1; j <= i; j++ {
			e := entries[j]
			if e.Writes() {
				same = false
				if e.Sector*uint64(l.SectorSize) < lwDiskBytes {
					dVersion = j
				}
			}
		}
		if err := rp.ApplyThrough(i); err != nil {
			t.Fatal(err)
		}
		if same && kind[i] == "flush" {
			s.dup++
			continue
		}
		last = i
		p := &lwPoint{entry: i, kind: kind[i], sameDiskAs: -1}
		t0 := time.Now()
		ok := t.Run(fmt.Sprintf("entry%06d-%s", i, p.kind), func(t *testing.T) {
			c.check(t, img, dVersion, p)
		})
		p.took = time.Since(t0)
		if !ok {
			p.result = "FAILED"
			s.failures = append(s.failures, fmt.Sprintf("log entry %v: %v", entries[i], p))
		}
		t.Logf("%v", p)
		s.add(p)
	}
	return s
}

// lwRun records op through dm-log-writes and replays its points (see the
// top of this file).
func lwRun(t *testing.T, op *lwOp) {
	testvm.RequireGuest(t)
	began := time.Now()
	budget := lwBudget(t)
	d := testvm.GuestDisks()
	if len(d) < 1 {
		t.Fatalf("want 1 disk, have %v", d)
	}
	lwFilter(t)
	writePW(t)
	rec := lwRecord(t, op, d[0])
	recorded := time.Since(began)

	lf, err := os.Open(lwLogFile)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	l, entries, start, done := lwOpenLog(t, lf)
	order, kind, distinct := lwPoints(t, op, entries, start, done, budget)

	img := logwrites.NewImage(lwDataBytes)
	rp := logwrites.NewReplayer(l, entries, img, lwDataBytes)
	c := &lwChecker{op: op, rec: rec, booted: map[int]*lwPoint{}}
	s := lwReplay(t, c, l, entries, rp, img, order, kind, began, budget)

	// The parser against the kernel: the whole log replayed is the data
	// disk as the run left it, byte for byte.
	if err := rp.ApplyThrough(len(entries) - 1); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img, rec.final) {
		n := 0
		for i := 0; i < len(img); i += 512 {
			if !bytes.Equal(img[i:i+512], rec.final[i:i+512]) {
				n++
			}
		}
		t.Errorf("the full replay differs from the data disk in %d sectors", n)
	} else {
		t.Logf("the full replay of %d entries equals the data disk (%d MiB) byte for byte", len(entries), len(img)>>20)
	}
	t.Logf("%d crash points replayed (%d of the %d flush points that change the disk; %d chosen flush points identical to the previous point not replayed again): %s",
		len(s.points), s.counts["flush points"], len(distinct), s.dup, lwSummary(s.counts))
	t.Logf("points by the journal's phase before replay / command run: %s", lwSummary(s.phases))
	t.Logf("time: recording %v (%s %v), replays %v, total %v",
		recorded.Round(time.Second), op.name, rec.took.Round(time.Second), (time.Since(began) - recorded).Round(time.Second), time.Since(began).Round(time.Second))
	for _, f := range s.failures {
		t.Errorf("FAILED crash point: %s", f)
	}
	if s.skipped > 0 {
		why := "the time budget " + budget.String() + " ran out (DMCONVERT_LW_BUDGET, or what go test -timeout left: give more)"
		if len(s.failures) >= 3 {
			why = "3 points failed"
		}
		t.Errorf("%d of %d points were not replayed: %s", s.skipped, len(order), why)
	}
}
