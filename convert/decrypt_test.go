package convert

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
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
		err := e.Abort(context.Background(), o)
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
	err := e.Resume(context.Background(), o)
	if err != nil {
		if strings.Contains(err.Error(), "already done") {
			sc.verifyPlain(w, e)
			return
		}
		t.Fatalf("resume after a crash at %s#%d (%s): %v", fp, nth, rec, err)
	}
	sc.verifyPlain(w, e)
}
