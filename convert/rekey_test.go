package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/dmtable"
)

// Rekey on the fake kernel: the whole data area of vda_crypt moves by the
// gap onto the new key, under a writer; crashes anywhere, then resume or
// abort.

const rekeyGap = 64 // sectors; the fake header leaves 96 free

func (sc *scenario) rekeyOptions() RekeyOptions {
	gap := Sectors(rekeyGap)
	if sc.luks1 {
		gap = luks1Gap
	}
	o := RekeyOptions{Target: "vda_crypt", Journal: sc.journal, Chunk: gap, Open: sc.rekeyOpener(), Passphrase: []byte("pw"),
		Cipher: sc.rekeyTo.cipher, KeySize: sc.rekeyTo.bits, InPlace: sc.inPlace}
	if sc.alsoPass != "" {
		o.Open = luks1Opener
		o.AlsoPassphrases = [][]byte{[]byte(sc.alsoPass)}
	}
	return o
}

// rekeyedOffset is where a finished rekey leaves the data: the gap
// closer to the start, or where it was (in place).
func (sc *scenario) rekeyedOffset() Sectors {
	switch {
	case sc.inPlace:
		return sc.H
	case sc.luks1:
		return sc.H - luks1Gap
	}
	return sc.H - rekeyGap
}

// rekeyTarget is the new key's cipher and size (bits) a rekey asks for;
// empty and 0 keep the source's.
type rekeyTarget struct {
	cipher string
	bits   int
}

// want is the crypt spec the new key must end with, from a source
// encrypted with aes-xts-plain64 and key.
func (rt rekeyTarget) want(key []byte) CryptSpec {
	cs := CryptSpec{Cipher: "aes-xts-plain64", KeyBytes: len(key), SectorSize: 512}
	if rt.cipher != "" {
		cs.Cipher = rt.cipher
	}
	if rt.bits != 0 {
		cs.KeyBytes = rt.bits / 8
	}
	return cs
}

// cipherChange is the cipher and key size change of the crash variant.
var cipherChange = rekeyTarget{cipher: "serpent-xts-plain64", bits: 256}

// rekeyOpener opens a fake header image: the data's key, and the staged
// new key when the image holds one.
func (sc *scenario) rekeyOpener() HeaderOpener {
	if sc.luks1 && sc.alsoPass != "" {
		return func(img []byte) (HeaderFormat, Keys, error) {
			h, ks, err := OpenLUKSImage(img, []byte(sc.alsoPass))
			if err != nil {
				return nil, Keys{}, err
			}
			return h, ks, nil
		}
	}
	if sc.luks1 {
		return luks1Opener
	}
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
	if sc.luks1 {
		sc.verifyLUKS1(w, e, true)
		return
	}
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
	fr, ok := fakeFinalRekey(disk)
	if !ok {
		sc.t.Fatal("the header on disk is not a finished rekey")
	}
	want := sc.rekeyTo.want(sc.key)
	if fr.off != sc.rekeyedOffset() || bytes.Equal(fr.key, sc.key) || len(fr.key) != want.KeyBytes || fr.cipher != want.Cipher {
		sc.t.Fatalf("rekeyed header: data at %d (want %d), key changed: %v, %d-bit %s key (want %d-bit %s)",
			fr.off, sc.rekeyedOffset(), !bytes.Equal(fr.key, sc.key), len(fr.key)*8, fr.cipher, want.KeyBytes*8, want.Cipher)
	}
	t, err := e.DM.Table("vda_crypt")
	if err != nil {
		sc.t.Fatal(err)
	}
	c, ok := t[0].Params.(*dmtable.Crypt)
	if len(t) != 1 || !ok || Sectors(c.Offset) != fr.off || !c.Key.Equal(dmtable.HexKey(fr.key)) || string(c.Cipher) != want.Cipher {
		sc.t.Fatalf("vda_crypt's table after rekey: %v (want cipher %s)", t, want.Cipher)
	}
	sc.coldOpenRekeyed(w)
}

// coldOpenRekeyed: in a fresh boot nothing activates on the raw disk, and
// the disk opened with the new key at the header's data offset holds
// every LV's data.
func (sc *scenario) coldOpenRekeyed(w *fakeWorld) {
	sc.t.Helper()
	fr, ok := fakeFinalRekey(fakeDiskIO{w: w, dev: sc.disk})
	if !ok || fr.off != sc.rekeyedOffset() {
		sc.t.Fatalf("the header on disk is not a finished rekey (data at %d)", fr.off)
	}
	// Opened as cryptsetup would: with the cipher and key the header says.
	sc.coldOpen(w, fr.off, fr.cipher, fr.key, "fresh boot after rekey")
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

// TestRekeyCipherChange: a rekey to another cipher and key size, under a
// writer: the new key's helper and the final mapping use the new cipher,
// the final header names it, a cold open with it finds every write.
func TestRekeyCipherChange(t *testing.T) {
	for i, rt := range []rekeyTarget{cipherChange, {cipher: "aes-cbc-essiv:sha256", bits: 256}, {bits: 256}} {
		t.Run(fmt.Sprintf("%s/%d", rt.cipher, rt.bits), func(t *testing.T) {
			sc, w := encryptedWorld(t, int64(25+i))
			sc.rekeyTo = rt
			e := sc.engine(w)
			want := rt.want(sc.key)
			seen := false
			e.FailHook = func(fp string) {
				sc.write(w)
				// While the data moves, the new key's helper has the
				// new cipher and the old key's the old one.
				if fp != "sync:after" || seen {
					return
				}
				list, _ := e.DM.List()
				for _, d := range list {
					tb, err := e.DM.Table(d.Name)
					if err != nil || len(tb) != 1 {
						continue
					}
					c, ok := tb[0].Params.(*dmtable.Crypt)
					switch {
					case !ok:
					case strings.HasSuffix(d.Name, "-new"):
						seen = true
						if string(c.Cipher) != want.Cipher || len(c.Key.Payload()) != 2*want.KeyBytes {
							t.Errorf("the new key's helper has a %d-bit %s key, want %d-bit %s", len(c.Key.Payload())*4, c.Cipher, want.KeyBytes*8, want.Cipher)
						}
					case strings.HasSuffix(d.Name, "-old"):
						if string(c.Cipher) != "aes-xts-plain64" || len(c.Key.Payload()) != 128 {
							t.Errorf("the old key's helper has a %d-bit %s key", len(c.Key.Payload())*4, c.Cipher)
						}
					}
				}
			}
			ep, err := e.PlanRekey(context.Background(), sc.rekeyOptions())
			if err != nil {
				t.Fatal(err)
			}
			if ep.Spec.Crypt != want || ep.Spec.OldCrypt.Cipher != "aes-xts-plain64" || ep.Spec.OldCrypt.KeyBytes != 64 {
				t.Fatalf("plan: new %+v (want %+v), old %+v", ep.Spec.Crypt, want, ep.Spec.OldCrypt)
			}
			if fh := ep.Header.(*fakeHeader); fh.staged != want.Cipher || len(fh.newKey) != want.KeyBytes {
				t.Fatalf("staged a %d-bit key for %q", len(fh.newKey)*8, fh.staged)
			}
			if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
				t.Fatal(err)
			}
			if !seen {
				t.Fatal("never saw the new key's helper")
			}
			sc.verifyRekeyed(w, e)
		})
	}
}

// TestRekeyCipherRefusals: a cipher or key size that is malformed, does
// not fit the cipher, or that the (fake) kernel does not offer is refused
// at plan time, naming the device and the reason, with nothing written
// and no device left behind.
func TestRekeyCipherRefusals(t *testing.T) {
	sc, w := encryptedWorld(t, 27)
	e := sc.engine(w)
	before, _ := e.DM.List()
	for _, c := range []struct {
		rt   rekeyTarget
		want string
	}{
		{rekeyTarget{bits: 100}, "key size 100 bits is not a multiple of 8"},
		{rekeyTarget{bits: -8}, "must be positive"},
		{rekeyTarget{bits: 2048}, "larger than LUKS2 allows"},
		{rekeyTarget{bits: 384}, "aes-xts-plain64 takes a 256- or 512-bit key, not 384 bits"},
		{rekeyTarget{cipher: "serpent-xts-plain64", bits: 264}, "XTS splits the key into two halves"},
		{rekeyTarget{cipher: "aes-cbc-essiv:sha256"}, "the key size stays 512 bits unless --key-size is given"},
		{rekeyTarget{cipher: "aes"}, "has no chaining mode"},
		{rekeyTarget{cipher: "serpent-xts"}, "has no IV mode"},
		{rekeyTarget{cipher: "aes-xts-"}, "empty IV mode"},
		{rekeyTarget{cipher: "capi:xts(aes)-plain64"}, "capi:"},
		{rekeyTarget{cipher: "cipher_null-ecb-null"}, "unencrypted"},
		{rekeyTarget{cipher: "aes:2-xts-plain64"}, "multi-key"},
		{rekeyTarget{cipher: "Serpent-XTS-plain64", bits: 256}, "character"},
		// Well formed, but the fake kernel offers no such cipher.
		{rekeyTarget{cipher: "twofish-xts-plain64", bits: 256}, "the kernel's dm-crypt refuses cipher twofish-xts-plain64 with a 256-bit key"},
		// Serpent runs in dmconvert too: its key sizes are checked first.
		{rekeyTarget{cipher: "serpent-xts-plain64", bits: 128}, "cipher serpent-xts-plain64 takes a 256- or 512-bit key, not 128 bits"},
	} {
		o := sc.rekeyOptions()
		o.Cipher, o.KeySize = c.rt.cipher, c.rt.bits
		name := fmt.Sprintf("%q/%d", c.rt.cipher, c.rt.bits)
		requireRefused(t, w, name, c.want, func() error {
			_, err := e.PlanRekey(context.Background(), o)
			var re *RefusalError
			if err != nil && (!errors.As(err, &re) || re.Device != fakeDiskPath) {
				t.Errorf("%s: not a refusal naming %s: %v", name, fakeDiskPath, err)
			}
			return err
		})
		if after, _ := e.DM.List(); len(after) != len(before) {
			t.Fatalf("%s: devices before %v, after %v", name, before, after)
		}
	}
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
		}, "keyslots 1, 3 are not opened"},
		{"half-done rekey", func(o *RekeyOptions) {
			o.Open = func([]byte) (HeaderFormat, Keys, error) {
				return &fakeHeader{h: sc.H, key: sc.key}, Keys{Bound: append([]byte(nil), sc.key...), Unbound: make([]byte, 64)}, nil
			}
		}, "unbound keyslot"},
		{"chunk below the sector size", func(o *RekeyOptions) { o.Chunk = 4 }, "chunk size is smaller than the sector size"},
		// The fake header stages one key only.
		{"further passphrase", func(o *RekeyOptions) { o.AlsoPassphrases = [][]byte{[]byte("other")} }, "keeps one passphrase"},
	} {
		o := sc.rekeyOptions()
		c.mod(&o)
		requireRefused(t, w, c.name, c.want, func() error {
			_, err := e.PlanRekey(context.Background(), o)
			return err
		})
	}
	// Less room before the data than the engine's MinRekeyGap: the
	// plan rewrites in place, in chunks of the size asked for, and the
	// data stays at H.
	ei := sc.engine(w)
	ei.MinRekeyGap = 4096
	ep, err := ei.PlanRekey(context.Background(), sc.rekeyOptions())
	if err != nil {
		t.Fatalf("a rekey with little room: %v", err)
	}
	if g, ph := ep.Spec.Forward.Geometry, ep.Spec.Forward.Phases; len(ph) != 4 || ph[1].Kind != PhaseMark || !ph[2].InPlace || ph[2].Chunk != rekeyGap ||
		g.HeaderUsed != sc.H || g.Devices[1].Phys != sc.H || g.Devices[2].Phys != sc.H {
		t.Fatalf("a rekey with little room plans %v on %v", ph, g.Devices)
	}
	ep.Wipe()
	// Other keyslots are dropped when asked.
	o := sc.rekeyOptions()
	o.RemoveOtherKeyslots = true
	o.Open = func([]byte) (HeaderFormat, Keys, error) {
		return &fakeHeader{h: sc.H, key: sc.key, others: []int{1}}, Keys{Bound: append([]byte(nil), sc.key...)}, nil
	}
	ep, err = e.PlanRekey(context.Background(), o)
	if err != nil {
		t.Fatalf("with RemoveOtherKeyslots: %v", err)
	}
	ep.Wipe()
}

// TestRekeyCrashAtEveryFailpoint: the rekey dies at every failpoint (a
// spread of hits), by process kill or power cut (with and without the
// disk's cache), then resume or abort finishes with every write intact.
func TestRekeyCrashAtEveryFailpoint(t *testing.T) {
	rekeyCrashMatrix(t, rekeyTarget{}, 23, 2000)
}

// TestRekeyCipherChangeCrashAtEveryFailpoint: the same matrix for a rekey
// to another cipher and key size (aes-xts-plain64 512 bits ->
// serpent-xts-plain64 256 bits): resume and abort rebuild the old key's
// mapping with the old cipher and the new key's with the new one from
// the journal, and the final header names the new cipher. The fake
// kernel's ciphers differ, so a table with the wrong one anywhere loses
// data.
func TestRekeyCipherChangeCrashAtEveryFailpoint(t *testing.T) {
	rekeyCrashMatrix(t, cipherChange, 24, 3000)
}

// TestRekeyLaggingCheckpointCrashAtEveryFailpoint: the rekey matrix with
// the header's checkpoint written only at a move's first and last chunk
// (CheckpointEvery of an hour): the journal alone records the chunks in
// between, and every recovery still ends with every write.
func TestRekeyLaggingCheckpointCrashAtEveryFailpoint(t *testing.T) {
	rekeyCrashMatrixOn(t, func(t *testing.T, seed int64) (*scenario, *fakeWorld) {
		sc, w := encryptedWorld(t, seed)
		sc.cpEvery = time.Hour
		return sc, w
	}, rekeyTarget{}, 25, 4000)
}

// TestRekeyInPlaceCrashAtEveryFailpoint: the matrix for a rekey in place
// (no room to move the data, or --in-place) with a cipher and key size
// change: the header marked and finished as for a gap, the data rewritten
// where it is, chunk by chunk, with each chunk's old ciphertext saved in
// the journal first; the data offset stays.
func TestRekeyInPlaceCrashAtEveryFailpoint(t *testing.T) {
	rekeyCrashMatrixOn(t, inPlaceWorld(encryptedWorld), cipherChange, 36, 7000)
}

// inPlaceWorld is world with the rekey asked to run in place.
func inPlaceWorld(world rekeyWorld) rekeyWorld {
	return func(t *testing.T, seed int64) (*scenario, *fakeWorld) {
		sc, w := world(t, seed)
		sc.inPlace = true
		return sc, w
	}
}

// rekeyWorld makes the world a rekey starts from: encryptedWorld (the
// fake header) or luks1EncryptedWorld (a real LUKS1 header).
type rekeyWorld func(t *testing.T, seed int64) (*scenario, *fakeWorld)

func rekeyCrashMatrix(t *testing.T, rt rekeyTarget, seed, seedBase int64) {
	rekeyCrashMatrixOn(t, encryptedWorld, rt, seed, seedBase)
}

func rekeyCrashMatrixOn(t *testing.T, world rekeyWorld, rt rekeyTarget, seed, seedBase int64) {
	sc, w := world(t, seed)
	sc.rekeyTo = rt
	e := sc.engine(w)
	_, hits := sc.runUntil(e, w, "", 0, sc.planRekey(e))
	cases := 0
	for _, fp := range Failpoints {
		for _, nth := range occurrences(hits[fp]) {
			for _, rec := range []recovery{recoverResume, recoverAbort, recoverPowerResume, recoverLostCacheResume, recoverLostCacheAbort} {
				cases++
				seed := seedBase + int64(cases)
				t.Run(fmt.Sprintf("%s#%d/%s", fp, nth, rec), func(t *testing.T) {
					t.Parallel()
					rekeyCrashAndRecover(t, world, rt, fp, nth, rec, seed)
				})
			}
		}
	}
	if cases == 0 {
		t.Fatal("the rekey reached no failpoint")
	}
	t.Logf("%d rekey crash cases", cases)
}

func rekeyCrashAndRecover(t *testing.T, world rekeyWorld, rt rekeyTarget, fp string, nth int, rec recovery, seed int64) {
	sc, w := world(t, seed)
	sc.rekeyTo = rt
	w, e := sc.crashEncrypted(t, w, fp, nth, rec, sc.planRekey)
	o := ResumeOptions{Journal: sc.journal, Open: sc.rekeyOpener()}
	done := func() {
		if sc.rekeyFinished(w) {
			sc.verifyRekeyed(w, e)
		} else {
			sc.verifyRekeyAborted(w, e)
		}
	}
	if rec == recoverAbort || rec == recoverLostCacheAbort {
		err := sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Abort(context.Background(), o) })
		switch {
		case err == nil:
			sc.verifyRekeyAborted(w, e)
			return
		case errors.Is(err, ErrTooLateToAbort):
		case strings.Contains(err.Error(), "already done"):
			done()
			return
		default:
			t.Fatalf("abort after a crash at %s#%d (%s): %v", fp, nth, rec, err)
		}
	}
	if err := sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Resume(context.Background(), o) }); err != nil {
		if strings.Contains(err.Error(), "already done") {
			done()
			return
		}
		t.Fatalf("resume after a crash at %s#%d (%s): %v", fp, nth, rec, err)
	}
	sc.verifyRekeyed(w, e)
}

// crashEncrypted makes the run plan(e) die at failpoint fp#nth (quiet
// before the crash for the lost-cache recoveries), then, for the power-cut
// recoveries, cuts the power and boots: LVM must activate nothing on the
// raw disk of an encrypted volume. It returns the world to recover and an
// engine on it whose failpoints write, as an application goes on writing.
func (sc *scenario) crashEncrypted(t *testing.T, w *fakeWorld, fp string, nth int, rec recovery, plan func(*Engine) func() error) (*fakeWorld, *Engine) {
	t.Helper()
	return sc.crashAndBoot(t, w, fp, nth, rec, plan, func(w *fakeWorld) {
		t.Fatal("boot-time LVM activated something on the raw encrypted disk")
	})
}

// crashAndBoot is crashEncrypted with activated called when boot-time LVM
// activates something on the raw disk.
func (sc *scenario) crashAndBoot(t *testing.T, w *fakeWorld, fp string, nth int, rec recovery, plan func(*Engine) func() error, activated func(*fakeWorld)) (*fakeWorld, *Engine) {
	t.Helper()
	sc.quiet = rec == recoverLostCacheResume || rec == recoverLostCacheAbort
	e := sc.engine(w)
	crashed, _ := sc.runUntil(e, w, fp, nth, plan(e))
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
			activated(w)
		}
	}
	e = sc.engine(w)
	sc.quiet = false
	e.FailHook = func(string) { sc.write(w) }
	// The first recovery is killed inside one of its device creates
	// (when it gets to that many), then run again: recoverOnce.
	sc.createKill = 1 + (nth+int(rec))%3
	return w, e
}

// rekeyFinished reports whether the header on the disk is a finished
// rekey's.
func (sc *scenario) rekeyFinished(w *fakeWorld) bool {
	if sc.luks1 {
		return sc.luks1Final(w) == luks1Rekeyed
	}
	_, ok := fakeFinalRekey(fakeDiskIO{w: w, dev: sc.disk})
	return ok
}

// verifyRekeyAborted checks the end of an aborted rekey: the volume as it
// was before, with the old key.
func (sc *scenario) verifyRekeyAborted(w *fakeWorld, e *Engine) {
	sc.t.Helper()
	if sc.luks1 {
		sc.verifyLUKS1(w, e, false)
		return
	}
	sc.verifyEncrypted(w, e)
}
