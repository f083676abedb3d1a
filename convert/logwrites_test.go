package convert

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
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
// A whole `dmconvert encrypt` is recorded through dm-log-writes: the disk
// D and the ext4 J holding the journal are two dm-linear slices of one
// log-writes device L, so one log orders the writes of both. The log
// keeps a write back until the flush that makes it durable, so a prefix
// of the log that ends at a FLUSH or FUA entry is the disk as a power cut
// at that instant leaves it, cache lost. Every such prefix after the
// "start" mark (and a seeded sample of prefixes between flushes: the
// cache partly written back) is replayed onto a copy; then a boot's tools
// must not map the half-converted disk wrongly, `dmconvert resume` (or
// `abort`, every third point) must finish, and every file and the raw
// LV's pattern must be intact.
//
// DMCONVERT_LW_SEED replays a sample (the seed is printed),
// DMCONVERT_LW_SAMPLES sets how many in-between points (default 8).

const (
	lwDiskBytes    = 24 << 20 // D: a 16 MiB PV, then two header sizes
	lwJournalBytes = 16 << 20 // J, after D on the same data disk
	lwDataBytes    = lwDiskBytes + lwJournalBytes
	lwLogBytes     = 512 << 20
	lwHeader       = 4 << 20

	lwLog      = "lwlog" // the log-writes device L
	lwDisk     = "lwd"   // D: what is converted
	lwJ        = "lwj"   // J: the journal's file system
	lwMapping  = lwDisk + "_crypt"
	lwTag      = "lw"
	lwJMount   = "/mnt/lwj"
	lwJournal  = lwJMount + "/lw.journal"
	lwState    = "/tmp/lwstate"
	lwScratch  = "/tmp/lw-scratch.img"
	lwLogFile  = "/tmp/lw-log.img"
	lwRawBlock = 4096
)

var lwKDF = []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}

// TestVMLogWrites boots one VM with one virtio disk, vda: D then J. The
// log lives on a loop device over a tmpfs file (in the first runs, a
// second virtio disk as the log now and then failed a large merged log
// write with an I/O error under host load, which disables logging), and
// so do the replays.
func TestVMLogWrites(t *testing.T) {
	testvm.RequireVM(t)
	bin := testvm.BuildStatic(t, "./cmd/dmconvert")
	env := map[string]string{}
	for _, k := range []string{"DMCONVERT_LW_SEED", "DMCONVERT_LW_SAMPLES"} {
		if v := os.Getenv(k); v != "" {
			env[k] = v
		}
	}
	start := time.Now()
	testvm.RunTestsInGuest(t, testvm.Options{
		Disks:   []testvm.Disk{{Size: lwDataBytes}},
		Run:     "^TestGuestLogWrites",
		Files:   map[string]string{"dmconvert": bin},
		Env:     env,
		MemMiB:  3072,
		Timeout: 20 * time.Minute,
	})
	t.Logf("dm-log-writes test: %v from build to shutdown", time.Since(start).Round(time.Second))
}

// lwFilter makes LVM see only D (and the final mapping): the data disk,
// L and the loop device under the replays carry the same PV label.
func lwFilter(t *testing.T) {
	const conf = "/etc/lvm/lvm.conf"
	orig, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	f := `[ "a|^/dev/mapper/` + lwDisk + `$|", "a|^/dev/mapper/` + lwMapping + `$|", "r|.*|" ]`
	var out []string
	replaced := false
	for _, l := range strings.Split(string(orig), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "filter =") || strings.HasPrefix(strings.TrimSpace(l), "global_filter =") {
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

// lwRawBlockData is block i of the raw LV's pattern.
func lwRawBlockData(i int) []byte {
	sum := sha256.Sum256([]byte(fmt.Sprintf("dmconvert log-writes raw block %d", i)))
	return bytes.Repeat(sum[:], lwRawBlock/len(sum))
}

func lwFillRaw(t testing.TB, dev string) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := int(blockDevBytes(t, dev) / lwRawBlock)
	for i := 0; i < n; i++ {
		if _, err := f.WriteAt(lwRawBlockData(i), int64(i)*lwRawBlock); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// lwCheckRaw compares the raw LV with its pattern.
func lwCheckRaw(t testing.TB, dev string) {
	t.Helper()
	b, err := os.ReadFile(dev)
	if err != nil {
		t.Fatal(err)
	}
	var bad []int
	for i := 0; i*lwRawBlock < len(b); i++ {
		if !bytes.Equal(b[i*lwRawBlock:(i+1)*lwRawBlock], lwRawBlockData(i)) {
			bad = append(bad, i)
		}
	}
	if len(bad) > 0 {
		t.Fatalf("raw LV %s: %d of %d 4 KiB blocks differ from the pattern (first: %v)", dev, len(bad), len(b)/lwRawBlock, bad[:min(len(bad), 8)])
	}
}

// lwVerify checks the active stack: fsck, files, raw pattern.
func lwVerify(t testing.TB, st *stack) {
	t.Helper()
	verifyStack(t, st, lwState)
	lwCheckRaw(t, st.RawLV)
}

// lwBuild makes the small live stack on D: a PV leaving two header sizes
// at the end, an ext4 LV with files (mounted) and a raw LV with a pattern.
func lwBuild(t testing.TB) *stack {
	t.Helper()
	disk := "/dev/mapper/" + lwDisk
	pvSize := uint64(lwDiskBytes-2*lwHeader) / 512
	vg := "vg" + lwTag
	sh(t, "pvcreate", "-y", "--setphysicalvolumesize", fmt.Sprintf("%ds", pvSize), disk)
	sh(t, "vgcreate", "-y", "-s", "1m", vg, disk)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", "8m", vg)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "4m", vg)
	sh(t, "vgchange", "-ay", vg)
	st := &stack{Tag: lwTag, Disk: disk, VG: vg, PVSize: pvSize, RawLV: "/dev/mapper/" + vg + "-raw"}
	dev := "/dev/mapper/" + vg + "-ext"
	mp := "/mnt/" + lwTag + "-ext"
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev)
	os.MkdirAll(mp, 0o755)
	sh(t, "mount", "-o", "noatime", dev, mp)
	st.Mounts, st.FSLVs, st.FSTypes, st.Sizes = []string{mp}, []string{"ext"}, []string{"ext4"}, []uint64{blockDevBytes(t, dev)}
	os.MkdirAll(lwState, 0o755)
	writeManifest(t, st, lwState)
	lwFillRaw(t, st.RawLV)
	return st
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

func lwReadStatus(t testing.TB) lwStatus {
	t.Helper()
	code, out := cliRun(t, "status", "--journal", lwJournal, "--json")
	var res struct {
		Result struct {
			Error string `json:"error"`
			Runs  []struct {
				Run *struct {
					Status    string `json:"status"`
					Aborting  bool   `json:"aborting"`
					Phase     int    `json:"phase"`
					Phases    int    `json:"phases"`
					PhaseName string `json:"phase_name"`
					Boundary  uint64 `json:"boundary"`
				} `json:"run"`
			} `json:"runs"`
		} `json:"result"`
	}
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, `{"result"`) {
			json.Unmarshal([]byte(l), &res)
		}
	}
	if code != 0 {
		return lwStatus{Err: fmt.Sprintf("exit %d: %s", code, strings.TrimSpace(res.Result.Error))}
	}
	if len(res.Result.Runs) != 1 || res.Result.Runs[0].Run == nil {
		t.Fatalf("status --journal %s: no run in its output:\n%s", lwJournal, out)
	}
	r := res.Result.Runs[0].Run
	return lwStatus{Exists: true, Status: r.Status, Aborting: r.Aborting, Phase: r.Phase, Phases: r.Phases, PhaseName: r.PhaseName, Boundary: r.Boundary}
}

// lwTeardown removes everything a replay point set up, as a power cut
// would, and forgets LVM's runtime state (a reboot starts without it).
func lwTeardown(t testing.TB, loop string) error {
	for _, mp := range []string{"/mnt/" + lwTag + "-ext", lwJMount} {
		if isMounted(mp) {
			if out, err := shOK("umount", mp); err != nil {
				return fmt.Errorf("umount %s: %v: %s", mp, err, out)
			}
		}
	}
	ours := func(n string) bool {
		return n == lwDisk || n == lwJ || n == lwMapping || n == "lwopen" || strings.HasPrefix(n, "vg"+lwTag+"-") || strings.HasPrefix(n, "dmconvert-")
	}
	for pass := 0; pass < 6; pass++ {
		out, _ := shOK("dmsetup", "ls")
		var left []string
		for _, l := range strings.Split(out, "\n") {
			if f := strings.Fields(l); len(f) > 0 && ours(f[0]) {
				left = append(left, f[0])
			}
		}
		if len(left) == 0 {
			break
		}
		if pass == 5 {
			return fmt.Errorf("device-mapper devices left: %v", left)
		}
		// Top down: LVs, then the final mapping and helpers, then D, J.
		sort.Slice(left, func(i, j int) bool { return lwRank(left[i]) < lwRank(left[j]) })
		for _, n := range left {
			shOK("dmsetup", "resume", n)
			shOK("dmsetup", "remove", n)
		}
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

func lwRank(name string) int {
	switch {
	case strings.HasPrefix(name, "vg"+lwTag+"-"):
		return 0
	case name == lwMapping || name == "lwopen":
		return 1
	case strings.HasPrefix(name, "dmconvert-"):
		return 2
	}
	return 3
}

// lwRecording is what the recorded run left.
type lwRecording struct {
	st      *stack
	final   []byte // the data disk's content after the run
	encrypt time.Duration
}

// lwRecord builds the stack on D over L, marks the log and runs the whole
// encryption, then takes everything down (L last, which writes the log's
// end mark).
func lwRecord(t *testing.T, data string) *lwRecording {
	if err := os.WriteFile(lwLogFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(lwLogFile, lwLogBytes); err != nil {
		t.Fatal(err)
	}
	logdev := strings.TrimSpace(sh(t, "losetup", "-f", "--show", lwLogFile))
	sh(t, "dmsetup", "create", lwLog, "--table", "0 "+lwSectors(lwDataBytes)+" log-writes "+data+" "+logdev)
	lwSlices(t, "/dev/mapper/"+lwLog)
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", "/dev/mapper/"+lwJ)
	os.MkdirAll(lwJMount, 0o755)
	sh(t, "mount", "/dev/mapper/"+lwJ, lwJMount)
	st := lwBuild(t)
	sh(t, "sync")
	sh(t, "dmsetup", "message", lwLog, "0", "mark", "start")
	t0 := time.Now()
	args := []string{"encrypt", st.Disk, "--batch-mode", "--json", "--key-file", pwFile, "--journal", lwJournal,
		"--header-size", "4M", "--chunk-size", "4M"}
	code, out := cliRun(t, append(args, lwKDF...)...)
	enc := time.Since(t0)
	requireExit(t, "the recorded encrypt", code, 0, out)
	sh(t, "dmsetup", "message", lwLog, "0", "mark", "done")
	deps := sh(t, "dmsetup", "deps", "-o", "devname", st.VG+"-ext")
	if !strings.Contains(deps, "("+lwMapping+")") {
		t.Fatalf("after the recorded run %s-ext does not map %s: %s", st.VG, lwMapping, deps)
	}
	lwVerify(t, st)
	if err := lwTeardown(t, ""); err != nil {
		t.Fatal(err)
	}
	st2 := strings.TrimSpace(sh(t, "dmsetup", "status", lwLog))
	sh(t, "dmsetup", "remove", lwLog)
	t.Logf("recorded encrypt took %v; log-writes status before removal: %s", enc.Round(time.Millisecond), st2)
	if strings.Contains(st2, "logging_disabled") {
		t.Fatalf("dm-log-writes disabled logging during the run (a failed log write, or the log device is full): the log is incomplete")
	}
	sh(t, "losetup", "-d", logdev)
	sh(t, "blockdev", "--flushbufs", data)
	final, err := os.ReadFile(data)
	if err != nil {
		t.Fatal(err)
	}
	return &lwRecording{st: st, final: final, encrypt: enc}
}

// lwPoint is one replayed crash point.
type lwPoint struct {
	entry  int
	kind   string // "flush", "between", "start", "done"
	cmd    string // "resume" or "abort"; "" when there was nothing to run
	abort  bool
	status lwStatus
	ident  Identity
	result string
	took   time.Duration
}

func (p *lwPoint) String() string {
	what := ""
	if p.cmd != "" {
		what = p.cmd + " -> "
	}
	return fmt.Sprintf("entry %d (%s): disk shows %v; journal: %v; %s%s in %v",
		p.entry, p.kind, p.ident, p.status, what, p.result, p.took.Round(time.Millisecond))
}

// lwCheck materialises the replayed image on a loop device, looks at it
// the way a boot does, then resumes or aborts and verifies.
// abort says, for a point that needs resume or abort, which one.
func lwCheck(t *testing.T, st *stack, img logwrites.Image, p *lwPoint, abort func() bool) {
	if err := os.WriteFile(lwScratch, img, 0o600); err != nil {
		t.Fatal(err)
	}
	loop := strings.TrimSpace(sh(t, "losetup", "-f", "--show", lwScratch))
	defer func() {
		if err := lwTeardown(t, loop); err != nil {
			t.Fatalf("tearing down the point: %v", err)
		}
	}()
	lwSlices(t, loop)
	sh(t, "mount", "/dev/mapper/"+lwJ, lwJMount)
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
	p.ident = Identify(first)
	p.status = lwReadStatus(t)

	// What a boot does before anyone runs dmconvert.
	shOK("pvscan", "--cache", "-aay")
	shOK("vgchange", "-ay", st.VG)
	if p.ident == IdentityLVM {
		// Still a plain PV: what LVM activates must be complete and
		// current (design.md section 3).
		if _, err := os.Stat("/dev/mapper/" + st.VG + "-ext"); err != nil {
			t.Fatalf("the disk carries an LVM label but LVM activated no LV of %s", st.VG)
		}
		lwVerify(t, st)
		for _, mp := range st.Mounts {
			sh(t, "umount", mp)
		}
	} else {
		if out, _ := shOK("dmsetup", "ls"); strings.Contains(out, st.VG+"-") {
			t.Fatalf("LVM activated LVs of the half-converted disk (it shows %v):\n%s", p.ident, out)
		}
		if out, err := shOK("cryptsetup", "open", "--key-file", pwFile, st.Disk, "lwopen"); err == nil {
			t.Fatalf("stock cryptsetup opened the half-converted disk (it shows %v):\n%s", p.ident, out)
		}
	}

	switch {
	case !p.status.Exists:
		// The run never recorded anything: the disk must be untouched.
		if p.ident != IdentityLVM {
			t.Fatalf("no run in the journal (%s) but the disk shows %v", p.status.Err, p.ident)
		}
		p.result = "no run recorded: plain PV verified"
		return
	case p.status.Status == "done":
		if p.ident != IdentityLUKS {
			t.Fatalf("the journal says done but the disk shows %v", p.ident)
		}
		sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, lwMapping)
		sh(t, "vgchange", "-ay", st.VG)
		lwVerify(t, st)
		p.result = "already done: opened with stock cryptsetup, verified"
		return
	}
	p.abort = abort()
	cmd := "resume"
	if p.abort {
		cmd = "abort"
	}
	p.cmd = cmd
	code, out := cliRun(t, cmd, "--journal", lwJournal, "--device", st.Disk, "--key-file", pwFile)
	if code != 0 {
		t.Fatalf("dmconvert %s at entry %d (disk shows %v; journal: %v): exit %d:\n%s", cmd, p.entry, p.ident, p.status, code, out)
	}
	if helpers, _ := shOK("dmsetup", "ls"); strings.Contains(helpers, "dmconvert-") {
		t.Fatalf("helper devices left after %s:\n%s", cmd, helpers)
	}
	// Live: the LVs are on the mapping the run ends with; then cold, as
	// the next boot sees the disk.
	want, typ := lwMapping, "crypto_LUKS"
	if p.abort {
		want, typ = lwDisk, "LVM2_member"
	}
	for _, lv := range []string{"ext", "raw"} {
		deps := sh(t, "dmsetup", "deps", "-o", "devname", st.VG+"-"+lv)
		if !strings.Contains(deps, "("+want+")") {
			t.Fatalf("after %s %s-%s does not map %s: %s", cmd, st.VG, lv, want, deps)
		}
	}
	for _, mp := range st.Mounts {
		if isMounted(mp) {
			sh(t, "umount", mp)
		}
	}
	sh(t, "dmsetup", "remove", st.VG+"-ext", st.VG+"-raw")
	if p.abort {
		if out, err := shOK("dmsetup", "info", lwMapping); err == nil {
			t.Fatalf("%s still exists after abort:\n%s", lwMapping, out)
		}
	} else {
		sh(t, "dmsetup", "remove", lwMapping)
	}
	if got, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", st.Disk); strings.TrimSpace(got) != typ {
		t.Fatalf("blkid -p %s says %q after %s, want %s", st.Disk, got, cmd, typ)
	}
	if !p.abort {
		sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, lwMapping)
	}
	sh(t, "vgchange", "-ay", st.VG)
	lwVerify(t, st)
	if p.abort {
		p.result = "aborted: plain PV verified cold"
	} else {
		p.result = "resumed: verified cold through stock cryptsetup"
	}
}

func lwEnvInt(name string, def int64) int64 {
	if v, err := strconv.ParseInt(os.Getenv(name), 10, 64); err == nil {
		return v
	}
	return def
}

// TestGuestLogWritesEncrypt records an encryption through dm-log-writes
// and replays every flush point of it (see the top of this file).
func TestGuestLogWritesEncrypt(t *testing.T) {
	testvm.RequireGuest(t)
	began := time.Now()
	d := testvm.GuestDisks()
	if len(d) < 1 {
		t.Fatalf("want 1 disk, have %v", d)
	}
	lwFilter(t)
	writePW(t)
	rec := lwRecord(t, d[0])
	recorded := time.Since(began)

	// Read the log.
	lf, err := os.Open(lwLogFile)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	l, err := logwrites.Open(lf, lwLogBytes)
	if err != nil {
		t.Fatal(err)
	}
	entries, err := l.Entries()
	if err != nil {
		t.Fatal(err)
	}
	start := logwrites.FindMark(entries, 0, "start")
	done := logwrites.FindMark(entries, max(start, 0), "done")
	if start < 0 || done < 0 {
		t.Fatalf("the log (%d entries) lacks the start or done mark", len(entries))
	}
	var nFlush, nFUA, nWrites, nDiscard, nMeta int
	var bytesW uint64
	for _, e := range entries[start:done] {
		switch {
		case e.Flags&logwrites.FlagDiscard != 0:
			nDiscard++
		case e.Writes():
			nWrites++
			bytesW += e.Sectors * uint64(l.SectorSize)
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
	t.Logf("log: %d entries, sector size %d; the run (entries %d..%d): %d writes (%d MiB), %d FLUSH, %d FUA, %d discards, %d REQ_META",
		len(entries), l.SectorSize, start, done, nWrites, bytesW>>20, nFlush, nFUA, nDiscard, nMeta)

	// The points: the start mark (nothing ran), every FLUSH/FUA of the
	// run, a seeded sample between them, and the done mark.
	seed := lwEnvInt("DMCONVERT_LW_SEED", time.Now().UnixNano())
	samples := int(lwEnvInt("DMCONVERT_LW_SAMPLES", 8))
	t.Logf("in-between points: %d, seed %d (DMCONVERT_LW_SEED=%d to replay)", samples, seed, seed)
	rng := rand.New(rand.NewSource(seed))
	kind := map[int]string{start: "start", done: "done"}
	for _, i := range logwrites.FlushPoints(entries, start+1, done) {
		kind[i] = "flush"
	}
	for _, i := range logwrites.SamplePoints(entries, start+1, done, samples, rng.Intn) {
		kind[i] = "between"
	}
	var order []int
	for i := range kind {
		order = append(order, i)
	}
	sort.Ints(order)

	img := logwrites.NewImage(lwDataBytes)
	rp := logwrites.NewReplayer(l, entries, img, lwDataBytes)
	var points []*lwPoint
	counts := map[string]int{}
	dup, failed, last, actioned := 0, 0, -1, 0
	for _, i := range order {
		if failed >= 3 {
			counts["not replayed after 3 failures"]++
			continue
		}
		// A point whose disk equals the previous point's (no write in
		// between) is the same crash: replay it once.
		same := last >= 0
		for j := last + 1; j <= i && same; j++ {
			same = !entries[j].Writes()
		}
		if err := rp.ApplyThrough(i); err != nil {
			t.Fatal(err)
		}
		if same && kind[i] == "flush" {
			dup++
			continue
		}
		last = i
		p := &lwPoint{entry: i, kind: kind[i]}
		points = append(points, p)
		t0 := time.Now()
		ok := t.Run(fmt.Sprintf("entry%06d-%s", i, p.kind), func(t *testing.T) {
			lwCheck(t, rec.st, img, p, func() bool {
				actioned++
				return actioned%3 == 0 // every third point that needs one is an abort
			})
		})
		p.took = time.Since(t0)
		if !ok {
			failed++
			p.result = "FAILED"
			t.Errorf("crash point %v: FAILED (log entry %v)", p, entries[i])
		}
		t.Logf("%v", p)
		counts[p.kind+" points"]++
		counts[strings.SplitN(p.result, ":", 2)[0]]++
	}

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
	var keys []string
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var summary []string
	for _, k := range keys {
		summary = append(summary, fmt.Sprintf("%s %d", k, counts[k]))
	}
	t.Logf("replayed %d crash points (%d flush points identical to the previous one skipped): %s",
		len(points), dup, strings.Join(summary, ", "))
	t.Logf("time: recording %v (encrypt %v), replays %v, total %v",
		recorded.Round(time.Second), rec.encrypt.Round(time.Second), (time.Since(began) - recorded).Round(time.Second), time.Since(began).Round(time.Second))
}
