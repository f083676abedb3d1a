package convert

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/lvm"
)

// fastTempDir is a temporary directory on tmpfs when there is one: the
// journal fsyncs at every step, and hundreds of crash cases run.
func fastTempDir(t *testing.T) string {
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "dmconvert-test-")
		if err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			return d
		}
	}
	return t.TempDir()
}

// scenario is one disk with a PV, its LVs and a writer that keeps writing
// through the LVs while the engine runs.
type scenario struct {
	t    *testing.T
	N, H Sectors
	// ivOffset: the IV of the data's first sector under a plain
	// mapping (cryptsetup --skip); 0 for LUKS.
	ivOffset Sectors
	pvSize   Sectors
	lvs      []fakeLV
	key      []byte
	disk     dmtable.Dev
	journal  string
	rng      *rand.Rand
	// expect is what every LV must read back: initial data plus every
	// acknowledged write.
	expect map[string][]byte
	writes int
	// quiet: no writer before the crash. An application's fsync flushes
	// the disk's whole cache, which would hide a missing flush of the
	// engine's own; lost-cache cases run quiet to catch that.
	quiet bool
	// rekeyTo is the cipher and key size a rekey asks for (zero: keep
	// the source's, aes-xts-plain64 with the 512-bit key).
	rekeyTo rekeyTarget
	// luks1: the disk carries a real LUKS1 header (luks1EncryptedWorld).
	luks1 bool
	// inPlace: a LUKS rekey rewrites in place (RekeyOptions.InPlace);
	// the data offset stays H.
	inPlace bool
	// alsoPass: a LUKS1 rekey keeps this passphrase too (a keyslot it
	// opens is added first; AlsoPassphrases), and recoveries open the
	// journal's header with it.
	alsoPass string
	// chunk is the encrypt's --chunk-size (zero: the header size, the
	// default).
	chunk Sectors
	// newKeyFile receives a plain rekey's new key; plainHeader, when set,
	// the detached LUKS2 header of a plain volume turned into LUKS2.
	newKeyFile, plainHeader string
	// tcrypt: the source is a TrueCrypt volume whose header area was
	// tcHead (its data moves to 0 and IVs from 0).
	tcrypt bool
	tcHead []byte
	// createKill: when k > 0, the next recovery (recoverOnce) is killed
	// inside its k-th device create, then run again.
	createKill int
	// tableless is the device recoverOnce's kill left without a table.
	tableless string
	// notPV: the mapping carries a file system, not a PV (lvs then
	// names the mapping itself; see fsDecryptWorld).
	notPV bool
	// cpEvery is the engine's CheckpointEvery (0: a checkpoint per chunk).
	cpEvery time.Duration
	// plainOnDisk: a plain volume turned into LUKS2 with its header on
	// the disk (w: the world its checks read).
	plainOnDisk bool
	w           *fakeWorld
	// tcKeyfiles: the TrueCrypt source's keyfiles (paths).
	tcKeyfiles []string
}

const fakeDiskPath = "/dev/vda"

// fakePVUUID is the UUID of the PV label in testdata/pv-head-4k.bin, the
// fake disk's first 4 KiB.
const fakePVUUID = "TYHR1B-XcRp-K5Nz-Du3y-30GV-eqTw-35q5ki"

func newScenario(t *testing.T, seed int64) *scenario {
	sc := &scenario{
		t: t, N: 4096, H: 128, pvSize: 3800,
		lvs: []fakeLV{
			{name: "vg-lv1", segs: []Extent{{Start: 8, End: 1000}}},
			{name: "vg-lv2", segs: []Extent{{Start: 1000, End: 1500}, {Start: 2000, End: 3800}}},
		},
		disk:    dmtable.Dev{Major: 254, Minor: 0},
		journal: filepath.Join(fastTempDir(t), "run.journal"),
		rng:     rand.New(rand.NewSource(seed)),
		expect:  map[string][]byte{},
	}
	sc.key = make([]byte, 64)
	sc.rng.Read(sc.key)
	return sc
}

// world builds the machine before the conversion: the disk with a real
// PV label and random data, the LVs active on it.
func (sc *scenario) world() *fakeWorld {
	w := newFakeWorld()
	d := w.addDisk(fakeDiskPath, sc.disk, sc.N)
	// Random data, from a fast generator seeded by the scenario's
	// (math/rand's Read was a tenth of the unit tests' CPU).
	x := uint64(sc.rng.Int63())
	for i := 0; i+8 <= len(d.durable); i += 8 {
		x++
		binary.LittleEndian.PutUint64(d.durable[i:], splitmix(x))
	}
	label, err := os.ReadFile("testdata/pv-head-4k.bin")
	if err != nil {
		sc.t.Fatal(err)
	}
	copy(d.durable, label)
	w.lvm = sc.lvm(w)
	if err := w.lvm.boot(); err != nil {
		sc.t.Fatal(err)
	}
	for _, lv := range sc.lvs {
		b, err := w.userRead(lv.name, 0, lv.size())
		if err != nil {
			sc.t.Fatal(err)
		}
		sc.expect[lv.name] = b
	}
	return w
}

func (sc *scenario) lvm(w *fakeWorld) *fakeLVM {
	return &fakeLVM{w: w, lvs: sc.lvs, notPV: sc.notPV, pv: PV{
		Device: fakeDiskPath, UUID: fakePVUUID, VG: "vg", Size: sc.pvSize, UsedEnd: sc.pvSize,
		PEStart: 8, ExtentSize: 8, VGDevices: []string{fakeDiskPath},
	}}
}

func (sc *scenario) engine(w *fakeWorld) *Engine {
	if w.lvm == nil || w.lvm.w != w {
		l := sc.lvm(w)
		if w.lvm != nil {
			l.pv = w.lvm.pv
		}
		w.lvm = l
	}
	return &Engine{
		DM:   fakeDM{w},
		Host: &fakeHost{w: w, fileDev: dmtable.Dev{Major: 8, Minor: 0}, diskByPt: map[string]dmtable.Dev{fakeDiskPath: sc.disk, "/dev/block/" + sc.disk.String(): sc.disk}},
		LVM:  w.lvm, RegionSize: 32, PollInterval: 1, CheckpointEvery: sc.cpEvery,
		// The fake disks are small: their gaps are a few KiB.
		MinRekeyGap: 8,
	}
}

func (sc *scenario) options() EncryptOptions {
	return EncryptOptions{
		Device: fakeDiskPath, Journal: sc.journal, HeaderSectors: sc.H, KeyBytes: 64, Chunk: cmp.Or(sc.chunk, sc.H),
		NewHeader: func(key []byte, ss uint32) (HeaderFormat, error) {
			copy(key, sc.key) // the test knows the key, to check the disk
			return &fakeHeader{h: sc.H, key: sc.key}, nil
		},
	}
}

func (sc *scenario) opener() HeaderOpener {
	return func(img []byte) (HeaderFormat, Keys, error) {
		return &fakeHeader{h: sc.H, key: sc.key}, Keys{Bound: append([]byte(nil), sc.key...)}, nil
	}
}

// write makes one random acknowledged-or-pending write through an LV.
func (sc *scenario) write(w *fakeWorld) {
	lv := sc.lvs[sc.rng.Intn(len(sc.lvs))]
	n := Sectors(1 + sc.rng.Intn(4))
	off := Sectors(sc.rng.Int63n(int64(lv.size() - n)))
	if sc.chunk != 0 && sc.rng.Intn(2) == 0 {
		// Small chunks: every other write goes to the disk's head (the
		// first LV's start), which leaves the disk in several steps.
		lv = sc.lvs[0]
		off = Sectors(sc.rng.Int63n(int64(sc.H - lv.segs[0].Start - n)))
	}
	data := make([]byte, n*512)
	sc.rng.Read(data)
	exp := sc.expect
	err := w.userWrite(lv.name, off, data, func() {
		copy(exp[lv.name][off*512:], data)
		sc.writes++
	})
	if err != nil && !strings.Contains(err.Error(), "no device") {
		sc.t.Fatalf("writer: %v", err)
	}
}

// verifyLVs reads every LV through the live stack and compares.
func (sc *scenario) verifyLVs(w *fakeWorld, when string) {
	sc.t.Helper()
	for _, lv := range sc.lvs {
		got, err := w.userRead(lv.name, 0, lv.size())
		if err != nil {
			sc.t.Fatalf("%s: reading %s: %v", when, lv.name, err)
		}
		if !bytes.Equal(got, sc.expect[lv.name]) {
			sc.t.Fatalf("%s: %s differs from what was written (first difference at byte %d)", when, lv.name, firstDiff(got, sc.expect[lv.name]))
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if i >= len(b) || a[i] != b[i] {
			return i
		}
	}
	return -1
}

// verifyEncrypted checks the end state of a finished encrypt: the live
// stack, then a fresh boot where nothing activates on the raw disk and a
// crypt mapping of the header's data area (what `cryptsetup open`
// creates) carries the PV.
func (sc *scenario) verifyEncrypted(w *fakeWorld, e *Engine) {
	sc.t.Helper()
	sc.verifyLVs(w, "after encrypt")
	name := "vda_crypt"
	info, err := e.DM.Info(name)
	if err != nil {
		sc.t.Fatal(err)
	}
	if !strings.HasPrefix(info.UUID, "CRYPT-LUKS2-") {
		sc.t.Fatalf("final mapping uuid %q", info.UUID)
	}
	list, _ := e.DM.List()
	if len(list) != 1+len(sc.lvs) {
		sc.t.Fatalf("devices left after encrypt: %v", list)
	}
	fh := &fakeHeader{h: sc.H}
	if !fh.isFinal(fakeDiskIO{w: w, dev: sc.disk}) {
		sc.t.Fatal("header on disk is not final")
	}
	sc.coldOpen(w, sc.H, "aes-xts-plain64", sc.key, "fresh boot after encrypt")
}

// coldOpen is a fresh boot of a snapshot of w: boot-time LVM must find
// nothing on the raw encrypted disk; the disk opened as cryptsetup would
// (cipher and key, data at off) must give back every LV.
func (sc *scenario) coldOpen(w *fakeWorld, off Sectors, cipher string, key []byte, what string) {
	sc.t.Helper()
	w2 := w.snapshot()
	w2.powerCut(false)
	l2 := sc.lvm(w2)
	if err := l2.boot(); err != nil {
		sc.t.Fatal(err)
	}
	if len(w2.devs) != 0 {
		sc.t.Fatal("boot-time LVM activated something on the raw encrypted disk")
	}
	if _, err := (fakeDM{w2}).Create("opened", "", dmtable.Table{cryptTarget(0, sc.N-off, CryptSpec{Cipher: cipher, IVOffset: sc.ivOffset}, dmtable.HexKey(key), 0, sc.disk, off)}); err != nil {
		sc.t.Fatal(err)
	}
	if err := l2.Activate(context.Background(), "vg", []string{"/dev/mapper/opened"}); err != nil {
		sc.t.Fatal(err)
	}
	sc.verifyLVs(w2, what)
}

// verifyPlain checks the end state of an abort: no device of the run,
// the LVs on the raw disk, and a fresh boot activates them from it.
func (sc *scenario) verifyPlain(w *fakeWorld, e *Engine) {
	sc.t.Helper()
	sc.verifyLVs(w, "after abort")
	list, _ := e.DM.List()
	for _, d := range list {
		if !strings.HasPrefix(d.Name, "vg-") {
			sc.t.Fatalf("device %s left after abort", d.Name)
		}
		deps, _ := e.DM.Deps(d.Name)
		for _, x := range deps {
			if x != sc.disk {
				sc.t.Fatalf("%s still maps %v after abort", d.Name, x)
			}
		}
	}
	w2 := w.snapshot()
	w2.powerCut(false)
	if err := sc.lvm(w2).boot(); err != nil {
		sc.t.Fatal(err)
	}
	sc.verifyLVs(w2, "fresh boot after abort")
}

func TestEncryptEndToEnd(t *testing.T) {
	for _, syncStep := range []int{0, 1} {
		t.Run(fmt.Sprintf("syncstep%d", syncStep), func(t *testing.T) {
			sc := newScenario(t, 1)
			w := sc.world()
			w.syncStep = syncStep
			e := sc.engine(w)
			e.FailHook = func(string) { sc.write(w) }
			ep, err := e.PlanEncrypt(context.Background(), sc.options())
			if err != nil {
				t.Fatal(err)
			}
			if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
				t.Fatal(err)
			}
			if sc.writes < 100 {
				t.Fatalf("only %d writes acknowledged during the run", sc.writes)
			}
			sc.verifyEncrypted(w, e)
			if l := w.lvm.refresh; len(l) != 1 || l[0] != "/dev/vda->/dev/mapper/vda_crypt" {
				t.Fatalf("lvm refresh calls: %v", l)
			}
		})
	}
}

// crashPanic unwinds the engine at a failpoint; the test restores the
// world snapshot taken at that instant, so nothing the unwinding does
// (deferred resumes) counts: that is a process killed there.
type crashPanic struct {
	world  *fakeWorld
	expect map[string][]byte
}

func (sc *scenario) expectCopy() map[string][]byte {
	m := map[string][]byte{}
	for k, v := range sc.expect {
		m[k] = append([]byte(nil), v...)
	}
	return m
}

// runUntil runs f with a hook that writes at every failpoint and crashes
// at the nth hit of name. It returns the world at the crash, or nil if
// the run finished without reaching it.
func (sc *scenario) runUntil(e *Engine, w *fakeWorld, name string, nth int, f func() error) (crashed *fakeWorld, hits map[string]int) {
	hits = map[string]int{}
	e.FailHook = func(n string) {
		if !sc.quiet {
			sc.write(w)
		}
		hits[n]++
		if n == name && hits[n] == nth {
			panic(crashPanic{w.snapshot(), sc.expectCopy()})
		}
	}
	defer func() { e.FailHook = nil }()
	crashed, err := sc.catchCrash(f)
	if crashed == nil && err != nil {
		sc.t.Fatalf("run before the crash at %s#%d failed: %v", name, nth, err)
	}
	return crashed, hits
}

// catchCrash runs f, returning the world at the instant of a crash inside
// it, or f's error.
func (sc *scenario) catchCrash(f func() error) (crashed *fakeWorld, err error) {
	defer func() {
		if p := recover(); p != nil {
			cp, ok := p.(crashPanic)
			if !ok {
				panic(p)
			}
			crashed = cp.world
			// Writes acknowledged by the dying world after the crash
			// instant (the unwinding resumes devices) never happened.
			sc.expect = cp.expect
		}
	}()
	return nil, f()
}

// recoverOnce runs f (a resume or an abort of the run on *w with *e).
// When sc.createKill is k > 0 (once), the process is killed inside f's
// k-th device create, between the kernel's create and the device's first
// table (a kill while dm-crypt starts its threads fails that load), so
// the device is left with no table; then f runs again, by a new process,
// on the world at that instant (*w and *e are replaced). If f creates
// fewer devices, it simply runs.
func (sc *scenario) recoverOnce(w **fakeWorld, e **Engine, f func(*Engine) error) error {
	k := sc.createKill
	sc.createKill = 0
	if k <= 0 {
		return f(*e)
	}
	cur := *w
	n := 0
	cur.createHook = func(name, uuid string) {
		if strings.HasPrefix(uuid, "LVM-") {
			return // an LV activated by an lvm command: another process
		}
		if n++; n == k {
			cur.addTableless(name, uuid)
			sc.tableless = name
			sc.t.Logf("the recovery is killed inside create #%d (%s), then run again", k, name)
			panic(crashPanic{cur.snapshot(), sc.expectCopy()})
		}
	}
	crashed, err := sc.catchCrash(func() error { return f(*e) })
	cur.createHook = nil
	if crashed == nil {
		return err
	}
	*w = crashed
	ne := sc.engine(crashed)
	ne.FailHook = func(string) { sc.write(crashed) }
	*e = ne
	return f(ne)
}

// TestFailpointsAllReached makes sure a full encrypt plus a full abort
// pass through every declared failpoint, so the crash tests below cover
// them all.
func TestFailpointsAllReached(t *testing.T) {
	seen := map[string]int{}
	for _, abort := range []bool{false, true} {
		sc := newScenario(t, 2)
		w := sc.world()
		e := sc.engine(w)
		_, hits := sc.runUntil(e, w, "", 0, func() error {
			ep, err := e.PlanEncrypt(context.Background(), sc.options())
			if err != nil {
				return err
			}
			if !abort {
				return e.Execute(context.Background(), ep, RunOptions{})
			}
			stopAfter := 0
			err = e.Execute(context.Background(), ep, RunOptions{Stop: func() bool { stopAfter++; return stopAfter > 12 }})
			if !errors.Is(err, ErrInterrupted) {
				return fmt.Errorf("stop: %v", err)
			}
			return e.Abort(context.Background(), ResumeOptions{Journal: sc.journal, Open: sc.opener()})
		})
		for k, v := range hits {
			seen[k] += v
		}
	}
	for _, f := range Failpoints {
		if seen[f] == 0 && !rewriteOnly[f] && !headerGapOnly[f] && !markOnly[f] {
			t.Errorf("failpoint %s never reached", f)
		}
	}
}

// occurrences picks which hits of a failpoint to crash at: all of them for
// rare ones, a spread for the per-chunk ones.
func occurrences(total int) []int {
	if total <= 6 {
		out := make([]int, total)
		for i := range out {
			out[i] = i + 1
		}
		return out
	}
	return []int{1, 2, total / 3, total / 2, total - 1, total}
}

type recovery int

const (
	recoverResume recovery = iota
	recoverAbort
	recoverPowerResume     // power cut, volatile caches kept (a QEMU kill)
	recoverLostCacheResume // power cut, volatile caches lost
	recoverLostCacheAbort
)

func (r recovery) String() string {
	return [...]string{"resume", "abort", "powercut-resume", "lostcache-resume", "lostcache-abort"}[r]
}

// TestCrashAtEveryFailpoint: for every failpoint and a spread of its hits,
// the process dies there (or the power goes, with or without the disk's
// volatile cache); then resume (or abort) must finish with every
// acknowledged write intact, and a boot in between must never activate
// LVM on a half-converted disk.
func TestCrashAtEveryFailpoint(t *testing.T) { crashMatrix(t, 0) }

// TestCrashAtEveryFailpointSmallChunks: the same with chunks of a
// quarter of the header, so that the head leaves the disk in several
// steps (while the disk still carries the PV label).
func TestCrashAtEveryFailpointSmallChunks(t *testing.T) { crashMatrix(t, 32) }

func crashMatrix(t *testing.T, chunk Sectors) {
	// Count the hits of a clean run.
	sc := newScenario(t, 3)
	sc.chunk = chunk
	w := sc.world()
	e := sc.engine(w)
	_, hits := sc.runUntil(e, w, "", 0, func() error {
		ep, err := e.PlanEncrypt(context.Background(), sc.options())
		if err != nil {
			return err
		}
		return e.Execute(context.Background(), ep, RunOptions{})
	})
	cases := 0
	for _, fp := range Failpoints {
		for _, nth := range occurrences(hits[fp]) {
			for _, rec := range []recovery{recoverResume, recoverAbort, recoverPowerResume, recoverLostCacheResume, recoverLostCacheAbort} {
				cases++
				seed := int64(cases)
				t.Run(fmt.Sprintf("%s#%d/%s", fp, nth, rec), func(t *testing.T) {
					t.Parallel()
					crashAndRecover(t, fp, nth, rec, seed, chunk)
				})
			}
		}
	}
	t.Logf("%d crash cases", cases)
}

func crashAndRecover(t *testing.T, fp string, nth int, rec recovery, seed int64, chunk Sectors) {
	sc := newScenario(t, seed)
	sc.chunk = chunk
	sc.quiet = rec == recoverLostCacheResume || rec == recoverLostCacheAbort
	w := sc.world()
	e := sc.engine(w)
	crashed, _ := sc.runUntil(e, w, fp, nth, func() error {
		ep, err := e.PlanEncrypt(context.Background(), sc.options())
		if err != nil {
			return err
		}
		return e.Execute(context.Background(), ep, RunOptions{})
	})
	if crashed == nil {
		t.Skipf("the run never reached %s#%d", fp, nth) // occurrences() only picks hits that exist
	}
	w = crashed
	switch rec {
	case recoverPowerResume, recoverLostCacheResume, recoverLostCacheAbort:
		w.powerCut(rec != recoverPowerResume)
		// Boot: LVM scans the raw disk. If it finds a PV there, the
		// data it shows must be whole (invariant 3).
		l := sc.lvm(w)
		if err := l.boot(); err != nil {
			t.Fatal(err)
		}
		if len(w.devs) > 0 {
			sc.verifyLVs(w, "boot-time activation on the raw disk")
		}
	}
	e = sc.engine(w)
	sc.quiet = false
	// Writes continue during recovery.
	e.FailHook = func(string) { sc.write(w) }
	sc.createKill = 1 + (nth+int(rec))%3
	o := ResumeOptions{Journal: sc.journal, Open: sc.opener()}
	var err error
	if rec == recoverAbort || rec == recoverLostCacheAbort {
		err = sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Abort(context.Background(), o) })
	} else {
		err = sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Resume(context.Background(), o) })
	}
	if err != nil {
		if strings.Contains(err.Error(), "already done") || strings.Contains(err.Error(), "already aborted") {
			// The crash came after the final commit: nothing to do.
			sc.verifyFinished(w, e)
			return
		}
		t.Fatalf("%s after a crash at %s#%d: %v", rec, fp, nth, err)
	}
	if rec == recoverAbort || rec == recoverLostCacheAbort {
		sc.verifyPlain(w, e)
	} else {
		sc.verifyEncrypted(w, e)
	}
}

func (sc *scenario) verifyFinished(w *fakeWorld, e *Engine) {
	fh := &fakeHeader{h: sc.H}
	if fh.isFinal(fakeDiskIO{w: w, dev: sc.disk}) {
		if _, err := e.DM.Info("vda_crypt"); err != nil {
			// Rebooted after the end: open it the way a user would.
			return
		}
		sc.verifyEncrypted(w, e)
		return
	}
	sc.verifyPlain(w, e)
}

// TestEncryptRefusesAKilledRunsDisk: an encrypt killed mid-run leaves its
// devices (F's mirror, the new helper's crypt target, both over the disk).
// A new encrypt of the disk with another journal is refused as that run's
// disk, naming the run's helper and saying to resume or abort it (before:
// "maps it with a crypt target, which dmconvert cannot restack"), and
// writes nothing.
func TestEncryptRefusesAKilledRunsDisk(t *testing.T) {
	sc := newScenario(t, 70)
	w := sc.world()
	e := sc.engine(w)
	crashed, _ := sc.runUntil(e, w, "commit:after", 3, func() error {
		ep, err := e.PlanEncrypt(context.Background(), sc.options())
		if err != nil {
			return err
		}
		return e.Execute(context.Background(), ep, RunOptions{})
	})
	if crashed == nil {
		t.Fatal("the run never reached commit:after#3")
	}
	var helper string
	for name, d := range crashed.devs {
		if strings.HasPrefix(d.uuid, helperUUIDPrefix) {
			helper = name
		}
	}
	if helper == "" {
		t.Fatalf("no helper among %v", crashed.devs)
	}
	sc.journal = filepath.Join(t.TempDir(), "second.journal")
	e = sc.engine(crashed)
	requireRefused(t, crashed, "a second encrypt", fakeDiskPath+": a dmconvert run's devices use it: "+helper+"; run dmconvert status, then resume or abort that run", func() error {
		_, err := e.PlanEncrypt(context.Background(), sc.options())
		return err
	})
}

// TestEncryptRefusesARunsHeader: after a reboot mid-run the disk starts
// with the LUKS header of a run in progress (LUKS2 with its token; LUKS1
// disguised, with its record). A new encrypt is refused as that run's,
// naming it and its journal, and writes nothing.
func TestEncryptRefusesARunsHeader(t *testing.T) {
	cp := Checkpoint{Run: "0123456789abcdef", Op: "encrypt", Plan: "forward", Phase: 4, Boundary: 1234, Journal: "/var/lib/dmconvert/x.journal"}
	for version, hs := range map[int]int64{2: 1 << 20, 1: 2 << 20} {
		sc := newScenario(t, 71)
		sc.N = 16384
		w := sc.world()
		img := inProgressImage(t, version, hs, cp)
		copy(w.disks[sc.disk].durable, img[:hs])
		e := sc.engine(w)
		e.LVM.(*fakeLVM).notPV = true // LVM finds no label there
		requireRefused(t, w, fmt.Sprintf("LUKS%d", version), fakeDiskPath+": a dmconvert encrypt (run 0123456789abcdef, journal /var/lib/dmconvert/x.journal) is in progress on it", func() error {
			_, err := e.PlanEncrypt(context.Background(), sc.options())
			return err
		})
	}
}

// TestEncryptRefusesOtherTargetsOnTheDisk: a mirror over the disk that is
// not an LV dmconvert can restack is refused, naming it; LVM's pvmove
// mirror is "busy" (exit 4) and says to let the pvmove finish. Nothing
// is written either way.
func TestEncryptRefusesOtherTargetsOnTheDisk(t *testing.T) {
	for _, c := range []struct {
		name, want string
		busy       bool
	}{
		{"vg-pvmove0", "a pvmove is moving extents of it (device-mapper device vg-pvmove0); let the pvmove finish", true},
		{"other-mirror", "device-mapper device other-mirror maps it with a mirror target, which dmconvert cannot restack", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			sc := newScenario(t, 1)
			w := sc.world()
			e := sc.engine(w)
			tb, err := dmtable.ParseTable(fmt.Sprintf("0 64 mirror core 1 32 2 %s 3000 %s 3500\n", sc.disk, sc.disk))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := e.DM.Create(c.name, "", tb); err != nil {
				t.Fatal(err)
			}
			before := append([]byte(nil), w.disks[sc.disk].durable...)
			_, err = e.PlanEncrypt(context.Background(), sc.options())
			if err == nil || !strings.Contains(err.Error(), fakeDiskPath+": "+c.want) {
				t.Fatalf("PlanEncrypt with %s on the disk: %v, want %q", c.name, err, c.want)
			}
			if errors.Is(err, ErrBusy) != c.busy {
				t.Fatalf("errors.Is(%v, ErrBusy) = %v, want %v", err, !c.busy, c.busy)
			}
			if !bytes.Equal(before, w.disks[sc.disk].durable) {
				t.Fatal("the disk changed")
			}
		})
	}
}

// TestEncryptRefreshFailure: when LVM's refresh fails at the end (its
// filter rejecting the new mapping, say), the run fails resumable with
// that reason only: F keeps its final table (the helpers are gone; before
// 2026-11-25 the failure path tried to load a table naming them and added
// "leaving vda_crypt in the committed state: ... no such device"). Once
// LVM accepts the mapping, resume ends the run.
func TestEncryptRefreshFailure(t *testing.T) {
	sc := newScenario(t, 73)
	w := sc.world()
	e := sc.engine(w)
	e.FailHook = func(string) { sc.write(w) }
	refuse := errors.New("fake lvm: Cannot use /dev/mapper/vda_crypt: device is rejected by filter config")
	w.lvm.refreshErr = refuse
	ep, err := e.PlanEncrypt(context.Background(), sc.options())
	if err != nil {
		t.Fatal(err)
	}
	err = e.Execute(context.Background(), ep, RunOptions{})
	if !errors.Is(err, refuse) || strings.Contains(err.Error(), "committed state") {
		t.Fatalf("the run ended with %v; want the refresh's failure alone", err)
	}
	sc.verifyLVs(w, "after the failed refresh")
	w.lvm.refreshErr = nil
	e = sc.engine(w)
	if err := e.Resume(context.Background(), ResumeOptions{Journal: sc.journal, Open: sc.opener()}); err != nil {
		t.Fatal(err)
	}
	sc.verifyEncrypted(w, e)
}

// TestPlansRefuseWhatLVMsFilterHides: an encrypt whose new mapping, or a
// decrypt whose raw disk, lvm.conf's filter rejects by every name is
// refused before anything is written, naming the VG, the device, the
// filter and its pattern, with the pattern to add. The filter is asked
// about every name the device will have.
func TestPlansRefuseWhatLVMsFilterHides(t *testing.T) {
	sc := newScenario(t, 74)
	w := sc.world()
	e := sc.engine(w)
	w.lvm.filterErr = &lvm.FilterError{Device: "/dev/mapper/vda_crypt", Setting: "devices/filter", Pattern: "r|.*|"}
	requireRefused(t, w, "encrypt", `after the conversion LVM would not see volume group `+w.lvm.pv.VG+` on /dev/mapper/vda_crypt: lvm.conf's devices/filter rejects /dev/mapper/vda_crypt (pattern "r|.*|"); let LVM accept it: in lvm.conf's devices/filter put "a|^/dev/mapper/vda_crypt$|" before "r|.*|"`, func() error {
		_, err := e.PlanEncrypt(context.Background(), sc.options())
		return err
	})
	got := w.lvm.filterNames
	if len(got) < 4 || got[0] != "/dev/mapper/vda_crypt" || !strings.HasPrefix(got[1], "/dev/dm-") || got[len(got)-1] != "/dev/disk/by-id/lvm-pv-uuid-"+w.lvm.pv.UUID {
		t.Fatalf("the filter was asked about %q", got)
	}
	w.lvm.filterErr = nil
	if _, err := e.PlanEncrypt(context.Background(), sc.options()); err != nil {
		t.Fatalf("accepted by the filter: %v", err)
	}

	sc, w = encryptedWorld(t, 75)
	e = sc.engine(w)
	w.lvm.filterErr = &lvm.FilterError{Device: fakeDiskPath, Setting: "devices/global_filter", Pattern: "r|/dev/vd|"}
	requireRefused(t, w, "decrypt", "after the conversion LVM would not see volume group "+w.lvm.pv.VG+" on "+fakeDiskPath, func() error {
		_, err := e.PlanDecrypt(context.Background(), sc.decryptOptions())
		return err
	})
	if got := w.lvm.filterNames; len(got) < 2 || got[0] != fakeDiskPath {
		t.Fatalf("the filter was asked about %q", got)
	}
	w.lvm.filterErr = errors.New("lvmconfig failed")
	if _, err := e.PlanDecrypt(context.Background(), sc.decryptOptions()); err == nil || !strings.Contains(err.Error(), "reading lvm's device filters") {
		t.Fatalf("a filter that cannot be read: %v", err)
	}
}
