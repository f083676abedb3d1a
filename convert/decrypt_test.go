package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
)

// encrypted returns a world whose disk was encrypted by a full (fake) run,
// with the LVs live on vda_crypt, and the scenario's expectations.
func encryptedWorld(t *testing.T, seed int64) (*scenario, *fakeWorld) {
	t.Helper()
	return encryptedWorldSized(t, seed, 0, 0)
}

// encryptedWorldSized is encryptedWorld on a disk of n sectors with a
// header of h (0: the defaults).
func encryptedWorldSized(t *testing.T, seed int64, n, h Sectors) (*scenario, *fakeWorld) {
	t.Helper()
	sc := newScenario(t, seed)
	if n > 0 {
		sc.N, sc.H = n, h
	}
	w := sc.world()
	e := sc.engine(w)
	ep, err := e.PlanEncrypt(context.Background(), sc.options())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	sc.journal = fastTempDir(t) + "/decrypt.journal"
	return sc, w
}

func (sc *scenario) decryptOptions() DecryptOptions {
	return DecryptOptions{Target: "vda_crypt", Journal: sc.journal, Chunk: sc.H, Open: sc.opener()}
}

func TestDecryptEndToEnd(t *testing.T) {
	sc, w := encryptedWorld(t, 11)
	e := sc.engine(w)
	e.FailHook = func(string) { sc.write(w) }
	ep, err := e.PlanDecrypt(context.Background(), sc.decryptOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	sc.verifyPlain(w, e)
}

func TestDecryptRefusals(t *testing.T) {
	sc, w := encryptedWorld(t, 12)
	e := sc.engine(w)
	for _, c := range []struct {
		name string
		mod  func(*DecryptOptions)
		want string
	}{
		{"unknown mapping", func(o *DecryptOptions) { o.Target = "nosuch" }, "neither a device-mapper device"},
		{"wrong passphrase", func(o *DecryptOptions) {
			o.Open = func([]byte) (HeaderFormat, Keys, error) { return nil, Keys{}, fmt.Errorf("x: %w", ErrWrongPassphrase) }
		}, "no key slot"},
		{"not the key of the mapping", func(o *DecryptOptions) {
			o.Open = func([]byte) (HeaderFormat, Keys, error) {
				k := make([]byte, 64)
				return &fakeHeader{h: sc.H, key: k}, Keys{Bound: k}, nil
			}
		}, "not the key"},
	} {
		o := sc.decryptOptions()
		c.mod(&o)
		requireRefused(t, w, c.name, c.want, func() error {
			_, err := e.PlanDecrypt(context.Background(), o)
			return err
		})
	}
}

// TestDecryptRefusesDuringPvmove: a pvmove moving extents of the PV on
// the mapping (its mirror maps the mapping directly) makes the decrypt
// busy, with nothing written.
func TestDecryptRefusesDuringPvmove(t *testing.T) {
	sc, w := encryptedWorld(t, 12)
	e := sc.engine(w)
	o := sc.decryptOptions()
	info, err := e.DM.Info(o.Target)
	if err != nil {
		t.Fatal(err)
	}
	tb, err := dmtable.ParseTable(fmt.Sprintf("0 64 mirror core 1 32 2 %s 1000 %s 2000\n", info.Dev, info.Dev))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.DM.Create("vg-pvmove0", "", tb); err != nil {
		t.Fatal(err)
	}
	var perr error
	requireRefused(t, w, "pvmove", "a pvmove is moving extents of it (device-mapper device vg-pvmove0)", func() error {
		_, perr = e.PlanDecrypt(context.Background(), o)
		return perr
	})
	if !errors.Is(perr, ErrBusy) {
		t.Fatalf("not busy: %v", perr)
	}
}

// requireRefused runs plan, which must fail with an error containing
// want and leave every disk of w exactly as it was.
func requireRefused(t *testing.T, w *fakeWorld, name, want string, plan func() error) {
	t.Helper()
	before := w.snapshot()
	if err := plan(); err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("%s: got %v, want %q", name, err, want)
	}
	for dev, d := range before.disks {
		if string(d.durable) != string(w.disks[dev].durable) || len(w.disks[dev].cache) != len(d.cache) {
			t.Fatalf("%s: the disk changed", name)
		}
	}
}

// TestDecryptCrashAtEveryFailpoint: the decrypt dies at every failpoint
// (a spread of hits), by process kill or power cut (with and without the
// disk's cache), then resume finishes with every write intact.
func TestDecryptCrashAtEveryFailpoint(t *testing.T) { decryptCrashMatrix(t, false) }

// headerGapOnly are the failpoints only a header-gap decrypt reaches (the
// head's write before its first block; an abort's header restore, which
// the matrix's abort cases reach: 59 of them fail without it).
var headerGapOnly = map[string]bool{"switch:head-written": true, "finalize:header-restored": true}

// TestDecryptHeaderGapEndToEnd: the decrypt that needs no room after the
// PV (the header area is its working space) ends with the LVs on the raw
// disk, and while it ran, boot-time tools found nothing on the disk.
func TestDecryptHeaderGapEndToEnd(t *testing.T) {
	sc, w := encryptedWorld(t, 14)
	e := sc.engine(w)
	o := sc.decryptOptions()
	o.HeaderGap = true
	ep, err := e.PlanDecrypt(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := ep.Spec.Forward.Geometry.device(HeadID); !ok || !ep.Spec.Forward.HeaderRestore {
		t.Fatalf("not a header-gap plan: %v", ep.Spec.Forward.Phases)
	}
	booted := 0
	e.FailHook = func(n string) {
		sc.write(w)
		if n != "commit:after" {
			return
		}
		// A fresh boot now: LVM activates the VG from the raw disk only
		// once the whole head is back.
		w2 := w.snapshot()
		w2.powerCut(false)
		if err := sc.lvm(w2).boot(); err != nil {
			t.Fatal(err)
		}
		if len(w2.devs) > 0 {
			booted++
			sc.verifyLVs(w2, "boot-time activation during a header-gap decrypt")
		}
	}
	if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	sc.verifyPlain(w, e)
	if booted > 2 {
		t.Fatalf("boot-time LVM found the PV on the raw disk at %d commits (the switch and what follows it are 2)", booted)
	}
}

// TestDecryptHeaderGapCrashAtEveryFailpoint is the crash matrix of the
// header-gap decrypt: resume finishes it, abort (until the head's first
// block is back) restores the LUKS header from the journal.
func TestDecryptHeaderGapCrashAtEveryFailpoint(t *testing.T) { decryptCrashMatrix(t, true) }

func decryptCrashMatrix(t *testing.T, gap bool) {
	sc, w := encryptedWorld(t, 13)
	e := sc.engine(w)
	_, hits := sc.runUntil(e, w, "", 0, func() error {
		o := sc.decryptOptions()
		o.HeaderGap = gap
		ep, err := e.PlanDecrypt(context.Background(), o)
		if err != nil {
			return err
		}
		return e.Execute(context.Background(), ep, RunOptions{})
	})
	for fp := range headerGapOnly {
		if gap && fp != "finalize:header-restored" && hits[fp] == 0 {
			t.Fatalf("the header-gap decrypt never reached failpoint %s", fp)
		}
	}
	cases := 0
	for _, fp := range Failpoints {
		for _, nth := range occurrences(hits[fp]) {
			for _, rec := range []recovery{recoverResume, recoverAbort, recoverPowerResume, recoverLostCacheResume, recoverLostCacheAbort} {
				cases++
				seed := int64(1000 + cases)
				t.Run(fmt.Sprintf("%s#%d/%s", fp, nth, rec), func(t *testing.T) {
					t.Parallel()
					decryptCrashAndRecover(t, fp, nth, rec, seed, gap)
				})
			}
		}
	}
	t.Logf("%d decrypt crash cases (header gap: %v)", cases, gap)
}

func decryptCrashAndRecover(t *testing.T, fp string, nth int, rec recovery, seed int64, gap bool) {
	sc, w := encryptedWorld(t, seed)
	plan := func(e *Engine) func() error {
		return func() error {
			o := sc.decryptOptions()
			o.HeaderGap = gap
			ep, err := e.PlanDecrypt(context.Background(), o)
			if err != nil {
				return err
			}
			return e.Execute(context.Background(), ep, RunOptions{})
		}
	}
	w, e := sc.crashAndBoot(t, w, fp, nth, rec, plan, func(w *fakeWorld) {
		// LVM found a PV on the raw disk: only after the last 4 KiB
		// came back, so everything must be there.
		sc.verifyLVs(w, "boot-time activation on the raw disk")
	})
	o := ResumeOptions{Journal: sc.journal, Open: sc.opener()}
	if rec == recoverAbort || rec == recoverLostCacheAbort {
		err := sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Abort(context.Background(), o) })
		switch {
		case err == nil:
			sc.verifyEncrypted(w, e)
			return
		case errors.Is(err, ErrTooLateToAbort):
			// Past the point of no return: finish instead.
		case strings.Contains(err.Error(), "already done"):
			sc.verifyPlain(w, e)
			return
		default:
			t.Fatalf("abort after a crash at %s#%d (%s): %v", fp, nth, rec, err)
		}
	}
	err := sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Resume(context.Background(), o) })
	if err != nil {
		if strings.Contains(err.Error(), "already done") {
			sc.verifyPlain(w, e)
			return
		}
		t.Fatalf("resume after a crash at %s#%d (%s): %v", fp, nth, rec, err)
	}
	sc.verifyPlain(w, e)
}

// fsDecryptWorld is encryptedWorld turned into a file system directly on
// the mapping: the LVs are gone, LVM finds nothing, and the writer writes
// anywhere in vda_crypt (the file system's view).
func fsDecryptWorld(t *testing.T, seed int64) (*scenario, *fakeWorld) {
	t.Helper()
	sc, w := encryptedWorld(t, seed)
	dm := fakeDM{w}
	for _, lv := range sc.lvs {
		if err := dm.Remove(lv.name); err != nil {
			t.Fatal(err)
		}
	}
	size := sc.N - sc.H
	sc.lvs = []fakeLV{{name: "vda_crypt", segs: []Extent{{Start: 0, End: size}}}}
	sc.notPV = true
	w.lvm = sc.lvm(w)
	b, err := w.userRead("vda_crypt", 0, size)
	if err != nil {
		t.Fatal(err)
	}
	sc.expect = map[string][]byte{"vda_crypt": b}
	return sc, w
}

func (sc *scenario) planFSDecrypt(e *Engine) func() error {
	return func() error {
		ep, err := e.PlanDecrypt(context.Background(), sc.decryptOptions())
		if err != nil {
			return err
		}
		return e.Execute(context.Background(), ep, RunOptions{})
	}
}

// rawDisk reads the disk's first n sectors as the next boot would.
func (sc *scenario) rawDisk(w *fakeWorld, n Sectors) []byte {
	sc.t.Helper()
	b := make([]byte, n*512)
	if _, err := (fakeDiskIO{w: w, dev: sc.disk}).ReadAt(b, 0); err != nil {
		sc.t.Fatal(err)
	}
	return b
}

// verifyFSDecrypted: no helper is left; the disk holds the file system
// from its first sector, also after a power cut; the mapping, if it
// still exists (no reboot since), is a linear map of it.
func (sc *scenario) verifyFSDecrypted(w *fakeWorld, e *Engine) {
	sc.t.Helper()
	P := sc.N - sc.H
	list, _ := e.DM.List()
	for _, d := range list {
		if d.Name != "vda_crypt" {
			sc.t.Fatalf("device %s left after the decrypt", d.Name)
		}
		tb, _ := e.DM.Table(d.Name)
		l, ok := tb[0].Params.(*dmtable.Linear)
		if len(tb) != 1 || !ok || l.Offset != 0 || Sectors(tb[0].Length) != P {
			sc.t.Fatalf("vda_crypt after the decrypt: %s", tb)
		}
		sc.verifyLVs(w, "the mapping after the decrypt")
	}
	w2 := w.snapshot()
	w2.powerCut(false)
	if got := sc.rawDisk(w2, P); !bytes.Equal(got, sc.expect["vda_crypt"]) {
		sc.t.Fatalf("the raw disk after the decrypt differs from the file system (first difference at byte %d)", firstDiff(got, sc.expect["vda_crypt"]))
	}
}

// verifyFSEncrypted: an aborted decrypt: the mapping is the crypt mapping
// of the disk again, the header is whole and final, and a fresh open of
// the disk with the key gives the file system.
func (sc *scenario) verifyFSEncrypted(w *fakeWorld, e *Engine) {
	sc.t.Helper()
	sc.verifyLVs(w, "after the abort")
	list, _ := e.DM.List()
	if len(list) != 1 {
		sc.t.Fatalf("devices after the abort: %v", list)
	}
	if !(&fakeHeader{h: sc.H}).isFinal(fakeDiskIO{w: w, dev: sc.disk}) {
		sc.t.Fatal("the header on disk is not whole and final after the abort")
	}
	w2 := w.snapshot()
	w2.powerCut(false)
	if _, err := (fakeDM{w2}).Create("opened", "", dmtable.Table{cryptTarget(0, sc.N-sc.H, CryptSpec{Cipher: "aes-xts-plain64"}, dmtable.HexKey(sc.key), 0, sc.disk, sc.H)}); err != nil {
		sc.t.Fatal(err)
	}
	got, err := w2.userRead("opened", 0, sc.N-sc.H)
	if err != nil || !bytes.Equal(got, sc.expect["vda_crypt"]) {
		sc.t.Fatalf("the disk opened cold after the abort differs from the file system (%v)", err)
	}
}

func TestDecryptFSEndToEnd(t *testing.T) {
	sc, w := fsDecryptWorld(t, 21)
	e := sc.engine(w)
	e.FailHook = func(string) { sc.write(w) }
	ep, err := e.PlanDecrypt(context.Background(), sc.decryptOptions())
	if err != nil {
		t.Fatal(err)
	}
	ph := ep.Spec.Forward.Phases
	if !ep.Spec.Forward.HeaderRestore || ph[len(ph)-1].Kind != PhaseFinalize || ep.Spec.VG != "" {
		t.Fatalf("not a header-gap plan that keeps the mapping: %v", ph)
	}
	if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	if sc.writes < 50 {
		t.Fatalf("only %d writes acknowledged during the run", sc.writes)
	}
	sc.verifyFSDecrypted(w, e)
}

// TestDecryptFSCrashAtEveryFailpoint: the decrypt of a file system on the
// mapping dies at every failpoint (process kill, power cut with and
// without the disk's cache). After a power cut, a boot that finds the
// file system on the raw disk (its first block is back) must find all of
// it, and mounts it and writes to it before resume runs: resume must keep
// those writes. Then resume (or abort, until the switch) ends with every
// write.
func TestDecryptFSCrashAtEveryFailpoint(t *testing.T) {
	sc, w := fsDecryptWorld(t, 22)
	e := sc.engine(w)
	_, hits := sc.runUntil(e, w, "", 0, sc.planFSDecrypt(e))
	if hits["switch:head-written"] == 0 {
		t.Fatal("the run never reached the head's switch")
	}
	cases := 0
	var mounted atomic.Int64
	for _, fp := range Failpoints {
		for _, nth := range occurrences(hits[fp]) {
			for _, rec := range []recovery{recoverResume, recoverAbort, recoverPowerResume, recoverLostCacheResume, recoverLostCacheAbort} {
				cases++
				seed := int64(3000 + cases)
				t.Run(fmt.Sprintf("%s#%d/%s", fp, nth, rec), func(t *testing.T) {
					t.Parallel()
					if fsDecryptCrashAndRecover(t, fp, nth, rec, seed) {
						mounted.Add(1)
					}
				})
			}
		}
	}
	t.Cleanup(func() {
		t.Logf("%d file system decrypt crash cases; the raw disk showed the file system after %d power cuts", cases, mounted.Load())
		if mounted.Load() == 0 {
			t.Error("no power cut left the file system visible on the raw disk: the boot-time check never ran")
		}
	})
}

func fsDecryptCrashAndRecover(t *testing.T, fp string, nth int, rec recovery, seed int64) (mounted bool) {
	sc, w := fsDecryptWorld(t, seed)
	w, e := sc.crashAndBoot(t, w, fp, nth, rec, sc.planFSDecrypt, func(*fakeWorld) {
		t.Fatal("boot-time LVM activated something")
	})
	P := sc.N - sc.H
	if rec != recoverResume && rec != recoverAbort {
		// The boot: is the file system's first block on the raw disk?
		raw := sc.rawDisk(w, P)
		exp := sc.expect["vda_crypt"]
		if bytes.Equal(raw[:4096], exp[:4096]) {
			mounted = true
			if !bytes.Equal(raw, exp) {
				t.Fatalf("after a power cut at %s#%d the raw disk shows the file system but differs from it at byte %d", fp, nth, firstDiff(raw, exp))
			}
			// The system mounts it and writes.
			d := fakeDiskIO{w: w, dev: sc.disk}
			for i := 0; i < 8; i++ {
				off := Sectors(sc.rng.Int63n(int64(P - 1)))
				data := make([]byte, 512)
				sc.rng.Read(data)
				if _, err := d.WriteAt(data, int64(off*512)); err != nil {
					t.Fatal(err)
				}
				copy(exp[off*512:], data)
			}
			d.Flush()
		}
	}
	o := ResumeOptions{Journal: sc.journal, Open: sc.opener()}
	if rec == recoverAbort || rec == recoverLostCacheAbort {
		err := sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Abort(context.Background(), o) })
		switch {
		case err == nil:
			if mounted {
				t.Fatal("an abort ran over a file system the system had mounted from the raw disk")
			}
			sc.verifyFSEncrypted(w, e)
			return
		case errors.Is(err, ErrTooLateToAbort):
		case strings.Contains(err.Error(), "already done"):
			sc.verifyFSDecrypted(w, e)
			return
		default:
			t.Fatalf("abort after a crash at %s#%d (%s): %v", fp, nth, rec, err)
		}
	}
	if err := sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Resume(context.Background(), o) }); err != nil && !strings.Contains(err.Error(), "already done") {
		t.Fatalf("resume after a crash at %s#%d (%s): %v", fp, nth, rec, err)
	}
	sc.verifyFSDecrypted(w, e)
	return
}

// TestDecryptRefusesAmbiguousDisk: a disk under two dm-crypt mappings
// (plain ones at two offsets, say), given by its path, is refused naming
// both: which one is meant is not for dmconvert to guess (before, the
// last one listed was taken). The mapping's own name still works.
func TestDecryptRefusesAmbiguousDisk(t *testing.T) {
	sc, w := encryptedWorld(t, 13)
	e := sc.engine(w)
	tb, err := dmtable.ParseTable(fmt.Sprintf("0 64 crypt aes-xts-plain64 %s 0 %s 4096\n", strings.Repeat("ab", 64), sc.disk))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.DM.Create("other_crypt", "", tb); err != nil {
		t.Fatal(err)
	}
	o := sc.decryptOptions()
	o.Target = fakeDiskPath
	requireRefused(t, w, "ambiguous", "several open dm-crypt mappings use it: other_crypt, vda_crypt", func() error {
		_, err := e.PlanDecrypt(context.Background(), o)
		return err
	})
	if _, err := e.PlanDecrypt(context.Background(), sc.decryptOptions()); err != nil {
		t.Fatalf("decrypt of the mapping by name beside another on its disk: %v", err)
	}
}
