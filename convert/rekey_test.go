package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
)

// Rekey on the fake kernel: the whole data area of vda_crypt moves by the
// gap onto the new key, under a writer; crashes anywhere, then resume or
// abort.

const rekeyGap = 64 // sectors; the fake header leaves 96 free

func (sc *scenario) rekeyOptions() RekeyOptions {
	return RekeyOptions{Target: "vda_crypt", Journal: sc.journal, Chunk: rekeyGap, Open: sc.rekeyOpener(), Passphrase: []byte("pw")}
}

// rekeyOpener opens a fake header image: the data's key, and the staged
// new key when the image holds one.
func (sc *scenario) rekeyOpener() HeaderOpener {
	return func(img []byte) (HeaderFormat, Keys, error) {
		nk := fakeStaged(img)
		return &fakeHeader{h: sc.H, key: sc.key, newKey: nk}, Keys{Bound: append([]byte(nil), sc.key...), Unbound: fakeStaged(img)}, nil
	}
}

// verifyRekeyed: the LVs read back through the live stack; only the
// mapping and the LVs are left; the header is final with the new key at
// H-G; a fresh boot opens the disk with the new key there.
func (sc *scenario) verifyRekeyed(w *fakeWorld, e *Engine) {
	sc.t.Helper()
	if _, err := e.DM.Info("vda_crypt"); err != nil && len(w.devs) == 0 {
		// Rebooted after the end: only the cold open is left to check.
		sc.coldOpenRekeyed(w)
		return
	}
	sc.verifyLVs(w, "after rekey")
	list, _ := e.DM.List()
	if len(list) != 1+len(sc.lvs) {
		sc.t.Fatalf("devices left after rekey: %v", list)
	}
	disk := fakeDiskIO{w: w, dev: sc.disk}
	off, key, ok := fakeFinalRekey(disk)
	if !ok {
		sc.t.Fatal("the header on disk is not a finished rekey")
	}
	if off != sc.H-rekeyGap || bytes.Equal(key, sc.key) {
		sc.t.Fatalf("rekeyed header: data at %d (want %d), key changed: %v", off, sc.H-rekeyGap, !bytes.Equal(key, sc.key))
	}
	t, err := e.DM.Table("vda_crypt")
	if err != nil {
		sc.t.Fatal(err)
	}
	c, ok := t[0].Params.(*dmtable.Crypt)
	if len(t) != 1 || !ok || Sectors(c.Offset) != off || !c.Key.Equal(dmtable.HexKey(key)) {
		sc.t.Fatalf("vda_crypt's table after rekey: %v", t)
	}
	sc.coldOpenRekeyed(w)
}

// coldOpenRekeyed: in a fresh boot nothing activates on the raw disk, and
// the disk opened with the new key at the header's data offset holds
// every LV's data.
func (sc *scenario) coldOpenRekeyed(w *fakeWorld) {
	sc.t.Helper()
	off, key, ok := fakeFinalRekey(fakeDiskIO{w: w, dev: sc.disk})
	if !ok || off != sc.H-rekeyGap {
		sc.t.Fatalf("the header on disk is not a finished rekey (data at %d)", off)
	}
	w2 := w.snapshot()
	w2.powerCut(false)
	l2 := sc.lvm(w2)
	if err := l2.boot(); err != nil {
		sc.t.Fatal(err)
	}
	if len(w2.devs) != 0 {
		sc.t.Fatal("boot-time LVM activated something on the raw encrypted disk")
	}
	if _, err := (fakeDM{w2}).Create("opened", "", dmtable.Table{cryptTarget(0, sc.N-off, CryptSpec{Cipher: "aes-xts-plain64"}, dmtable.HexKey(key), 0, sc.disk, off)}); err != nil {
		sc.t.Fatal(err)
	}
	if err := l2.Activate(context.Background(), "vg", []string{"/dev/mapper/opened"}); err != nil {
		sc.t.Fatal(err)
	}
	sc.verifyLVs(w2, "fresh boot after rekey")
}

func (sc *scenario) planRekey(e *Engine) func() error {
	return func() error {
		ep, err := e.PlanRekey(context.Background(), sc.rekeyOptions())
		if err != nil {
			return err
		}
		return e.Execute(context.Background(), ep, RunOptions{})
	}
}

func TestRekeyEndToEnd(t *testing.T) {
	sc, w := encryptedWorld(t, 21)
	e := sc.engine(w)
	e.FailHook = func(string) { sc.write(w) }
	if err := sc.planRekey(e)(); err != nil {
		t.Fatal(err)
	}
	if sc.writes == 0 {
		t.Fatal("the writer wrote nothing during the rekey")
	}
	sc.verifyRekeyed(w, e)
}

func TestRekeyRefusals(t *testing.T) {
	sc, w := encryptedWorld(t, 22)
	e := sc.engine(w)
	for _, c := range []struct {
		name string
		mod  func(*RekeyOptions)
		want string
	}{
		{"unknown mapping", func(o *RekeyOptions) { o.Target = "nosuch" }, "neither a device-mapper device"},
		{"wrong passphrase", func(o *RekeyOptions) {
			o.Open = func([]byte) (HeaderFormat, Keys, error) { return nil, Keys{}, fmt.Errorf("x: %w", ErrWrongPassphrase) }
		}, "no key slot"},
		{"other keyslots", func(o *RekeyOptions) {
			o.Open = func([]byte) (HeaderFormat, Keys, error) {
				return &fakeHeader{h: sc.H, key: sc.key, others: []int{1, 3}}, Keys{Bound: append([]byte(nil), sc.key...)}, nil
			}
		}, "keyslots [1 3] are not opened"},
		{"half-done rekey", func(o *RekeyOptions) {
			o.Open = func([]byte) (HeaderFormat, Keys, error) {
				return &fakeHeader{h: sc.H, key: sc.key}, Keys{Bound: append([]byte(nil), sc.key...), Unbound: make([]byte, 64)}, nil
			}
		}, "unbound keyslot"},
		{"no room", func(o *RekeyOptions) { o.Chunk = 4 }, "no room"},
	} {
		o := sc.rekeyOptions()
		c.mod(&o)
		requireRefused(t, w, c.name, c.want, func() error {
			_, err := e.PlanRekey(context.Background(), o)
			return err
		})
	}
	// Other keyslots are dropped when asked.
	o := sc.rekeyOptions()
	o.RemoveOtherKeyslots = true
	o.Open = func([]byte) (HeaderFormat, Keys, error) {
		return &fakeHeader{h: sc.H, key: sc.key, others: []int{1}}, Keys{Bound: append([]byte(nil), sc.key...)}, nil
	}
	ep, err := e.PlanRekey(context.Background(), o)
	if err != nil {
		t.Fatalf("with RemoveOtherKeyslots: %v", err)
	}
	ep.Wipe()
}

// TestRekeyCrashAtEveryFailpoint: the rekey dies at every failpoint (a
// spread of hits), by process kill or power cut (with and without the
// disk's cache), then resume or abort finishes with every write intact.
func TestRekeyCrashAtEveryFailpoint(t *testing.T) {
	sc, w := encryptedWorld(t, 23)
	e := sc.engine(w)
	_, hits := sc.runUntil(e, w, "", 0, sc.planRekey(e))
	cases := 0
	for _, fp := range Failpoints {
		for _, nth := range occurrences(hits[fp]) {
			for _, rec := range []recovery{recoverResume, recoverAbort, recoverPowerResume, recoverLostCacheResume, recoverLostCacheAbort} {
				cases++
				seed := int64(2000 + cases)
				t.Run(fmt.Sprintf("%s#%d/%s", fp, nth, rec), func(t *testing.T) {
					t.Parallel()
					rekeyCrashAndRecover(t, fp, nth, rec, seed)
				})
			}
		}
	}
	if cases == 0 {
		t.Fatal("the rekey reached no failpoint")
	}
	t.Logf("%d rekey crash cases", cases)
}

func rekeyCrashAndRecover(t *testing.T, fp string, nth int, rec recovery, seed int64) {
	sc, w := encryptedWorld(t, seed)
	sc.quiet = rec == recoverLostCacheResume || rec == recoverLostCacheAbort
	e := sc.engine(w)
	crashed, _ := sc.runUntil(e, w, fp, nth, sc.planRekey(e))
	if crashed == nil {
		t.Skipf("the run never reached %s#%d", fp, nth)
	}
	w = crashed
	if rec != recoverResume && rec != recoverAbort {
		w.powerCut(rec != recoverPowerResume)
		l := sc.lvm(w)
		if err := l.boot(); err != nil {
			t.Fatal(err)
		}
		if len(w.devs) > 0 {
			t.Fatal("boot-time LVM activated something on the raw encrypted disk")
		}
	}
	e = sc.engine(w)
	sc.quiet = false
	e.FailHook = func(string) { sc.write(w) }
	o := ResumeOptions{Journal: sc.journal, Open: sc.rekeyOpener()}
	done := func() {
		if _, _, ok := fakeFinalRekey(fakeDiskIO{w: w, dev: sc.disk}); ok {
			sc.verifyRekeyed(w, e)
		} else {
			sc.verifyEncrypted(w, e)
		}
	}
	if rec == recoverAbort || rec == recoverLostCacheAbort {
		err := e.Abort(context.Background(), o)
		switch {
		case err == nil:
			sc.verifyEncrypted(w, e)
			return
		case errors.Is(err, ErrTooLateToAbort):
		case strings.Contains(err.Error(), "already done"):
			done()
			return
		default:
			t.Fatalf("abort after a crash at %s#%d (%s): %v", fp, nth, rec, err)
		}
	}
	if err := e.Resume(context.Background(), o); err != nil {
		if strings.Contains(err.Error(), "already done") {
			done()
			return
		}
		t.Fatalf("resume after a crash at %s#%d (%s): %v", fp, nth, rec, err)
	}
	sc.verifyRekeyed(w, e)
}
