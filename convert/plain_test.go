package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/journal"
	"github.com/dmconvert/dmconvert/luks"
)

// The key digests' PBKDF2 count is a cost against guessing the keys from
// a stolen journal; the fake-kernel tests only need the digests to match
// and differ, and their thousands of plain runs spent a tenth of this
// package's unit-test CPU on them at the real count.
func init() { plainDigestIter = 64 }

// Plain dm-crypt rekey on the fake kernel: vda_crypt, opened as a plain
// mapping (cryptsetup's CRYPT-PLAIN- uuid) of the disk at H, carries a PV
// with LVs under a writer; its data is rewritten in place, chunk by chunk,
// with a new key written to a key file; crashes anywhere, then resume or
// abort.

const plainChunk = 48 // sectors

// rewriteOnly are the failpoints only an in-place rewrite (a plain
// rekey) reaches; the other operations' matrices leave them out, and
// TestPlainRekeyCrashAtEveryFailpoint requires them.
var rewriteOnly = map[string]bool{"rewrite:saved": true, "rewrite:written": true}

func plainWorld(t *testing.T, seed int64) (*scenario, *fakeWorld) {
	t.Helper()
	sc, w := encryptedWorld(t, seed)
	w.mu.Lock()
	w.devs["vda_crypt"].uuid = "CRYPT-PLAIN-vda_crypt"
	w.mu.Unlock()
	sc.newKeyFile = filepath.Join(t.TempDir(), "new.key")
	return sc, w
}

// plainWorldIV is plainWorld with the mapping's IVs counted from
// plainIVOffset (cryptsetup open --type plain --skip): its data is
// rewritten through a table with that IV offset.
func plainWorldIV(t *testing.T, seed int64) (*scenario, *fakeWorld) {
	t.Helper()
	sc, w := plainWorld(t, seed)
	sc.setIVOffset(w, plainIVOffset)
	return sc, w
}

// setIVOffset reloads vda_crypt with its IVs counted from iv and writes
// its data back through it: the same contents, encrypted as a mapping
// with that IV offset holds them. It returns the mapping's size.
func (sc *scenario) setIVOffset(w *fakeWorld, iv Sectors) Sectors {
	t := sc.t
	t.Helper()
	e := sc.engine(w)
	tbl, err := e.DM.Table("vda_crypt")
	if err != nil {
		t.Fatal(err)
	}
	n := Sectors(tbl[0].Length)
	data, err := w.userRead("vda_crypt", 0, n)
	if err != nil {
		t.Fatal(err)
	}
	tbl[0].Params.(*dmtable.Crypt).IVOffset = dmtable.Sectors(iv)
	for _, err := range []error{e.DM.Load("vda_crypt", tbl), e.DM.Suspend("vda_crypt"), e.DM.Resume("vda_crypt"), w.userWrite("vda_crypt", 0, data, nil)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	sc.ivOffset = iv
	return n
}

const plainIVOffset = 4096

func (sc *scenario) plainOptions() PlainRekeyOptions {
	if sc.plainOnDisk {
		return PlainRekeyOptions{Target: "vda_crypt", Type: "luks2", Passphrase: []byte("pw"),
			PBKDF:   luks.PBKDF{Type: luks.KDFPBKDF2, Iterations: 1000},
			Journal: sc.journal, Chunk: plainChunk, Cipher: sc.rekeyTo.cipher, KeySize: sc.rekeyTo.bits}
	}
	if sc.plainHeader != "" {
		return PlainRekeyOptions{Target: "vda_crypt", Type: "luks2", HeaderFile: sc.plainHeader, Passphrase: []byte("pw"),
			PBKDF: luks.PBKDF{Type: luks.KDFPBKDF2, Iterations: 1000}, HeaderSize: 1 << 20, TCryptKeyfiles: sc.tcKeyfiles,
			Journal: sc.journal, Chunk: plainChunk, Cipher: sc.rekeyTo.cipher, KeySize: sc.rekeyTo.bits}
	}
	return PlainRekeyOptions{Target: "vda_crypt", NewKeyFile: sc.newKeyFile, Journal: sc.journal, Chunk: plainChunk,
		Cipher: sc.rekeyTo.cipher, KeySize: sc.rekeyTo.bits}
}

// plainLUKS2World is plainWorld for a conversion to LUKS2 with a
// detached header.
func plainLUKS2World(t *testing.T, seed int64) (*scenario, *fakeWorld) {
	t.Helper()
	// The data must start past a LUKS2 header's metadata and one
	// 512-bit keyslot (290816 bytes), even for a detached header.
	sc, w := encryptedWorldSized(t, seed, 5120, 640)
	w.mu.Lock()
	w.devs["vda_crypt"].uuid = "CRYPT-PLAIN-vda_crypt"
	w.mu.Unlock()
	sc.plainHeader = filepath.Join(t.TempDir(), "vda.hdr")
	return sc, w
}

// plainLUKS2OnDiskWorld is plainLUKS2World for a conversion to LUKS2
// with the header on the disk, in the sectors before the data (which the
// plain mapping leaves unused: zeros here).
func plainLUKS2OnDiskWorld(t *testing.T, seed int64) (*scenario, *fakeWorld) {
	t.Helper()
	sc, w := plainLUKS2World(t, seed)
	sc.plainHeader, sc.plainOnDisk = "", true
	w.mu.Lock()
	d := w.disks[sc.disk]
	d.flush()
	clear(d.durable[:sc.H*512])
	w.mu.Unlock()
	return sc, w
}

// onDiskHeader reads the LUKS2 header before the data (nil: none there).
func (sc *scenario) onDiskHeader(w *fakeWorld) *luks.Header {
	sc.t.Helper()
	b := make([]byte, sc.H*512)
	if _, err := (fakeDiskIO{w: w, dev: sc.disk}).ReadAt(b, 0); err != nil {
		sc.t.Fatal(err)
	}
	h, err := luks.Read(bytes.NewReader(b))
	if err != nil {
		return nil
	}
	return h
}

func (sc *scenario) planPlain(e *Engine) func() error {
	return func() error {
		ep, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
		if err != nil {
			return err
		}
		return e.Execute(context.Background(), ep, RunOptions{})
	}
}

func (sc *scenario) plainResumeOptions() ResumeOptions {
	return ResumeOptions{Journal: sc.journal, OldKey: func() ([]byte, error) { return append([]byte(nil), sc.key...), nil },
		Passphrase: []byte("pw")}
}

// verifyPlainFinal: the LVs read back through the live stack; only the
// mapping and the LVs are left; the mapping is the plain mapping of key
// (its cipher, at H, cryptsetup's uuid); a fresh boot that opens the disk
// with key finds every LV's data.
//
// A TrueCrypt source's rekeyed data is at 0 with IVs from 0.
func (sc *scenario) verifyPlainFinal(w *fakeWorld, e *Engine, key []byte, cipher string, rekeyed bool, what string) {
	sc.t.Helper()
	off := sc.H
	if sc.tcrypt && rekeyed {
		saved := sc.ivOffset
		sc.ivOffset = 0
		defer func() { sc.ivOffset = saved }()
		off = 0
	}
	if _, err := e.DM.Info("vda_crypt"); err != nil && len(w.devs) == 0 {
		sc.coldOpen(w, off, cipher, key, "fresh boot "+what)
		return
	}
	sc.verifyLVs(w, what)
	list, _ := e.DM.List()
	if len(list) != 1+len(sc.lvs) {
		sc.t.Fatalf("devices left %s: %v", what, list)
	}
	info, err := e.DM.Info("vda_crypt")
	if err != nil || !strings.HasPrefix(info.UUID, "CRYPT-PLAIN-") && !strings.HasPrefix(info.UUID, "CRYPT-LUKS2-") && !strings.HasPrefix(info.UUID, tcryptUUIDPrefix) {
		sc.t.Fatalf("vda_crypt %s: uuid %q, %v", what, info.UUID, err)
	}
	t, err := e.DM.Table("vda_crypt")
	if err != nil {
		sc.t.Fatal(err)
	}
	c, ok := t[0].Params.(*dmtable.Crypt)
	if len(t) != 1 || !ok || Sectors(c.Offset) != off || !c.Key.Equal(dmtable.HexKey(key)) || string(c.Cipher) != cipher || Sectors(c.IVOffset) != sc.ivOffset {
		sc.t.Fatalf("vda_crypt's table %s: %v (want %s at %d, IV offset %d, with the expected key)", what, t, cipher, off, sc.ivOffset)
	}
	sc.coldOpen(w, off, cipher, key, "fresh boot "+what)
}

func (sc *scenario) newPlainKey() []byte {
	sc.t.Helper()
	if sc.plainHeader != "" || sc.plainOnDisk {
		// The detached header (or the one on the disk): no longer
		// marked, the passphrase opens it to the new key, its data
		// segment is where the plain data was.
		var h *luks.Header
		if sc.plainOnDisk {
			if h = sc.onDiskHeader(sc.w); h == nil {
				sc.t.Fatal("no LUKS2 header on the disk after the run")
			}
		} else {
			b, err := os.ReadFile(sc.plainHeader)
			if err != nil {
				sc.t.Fatal(err)
			}
			if h, err = luks.Read(bytes.NewReader(b)); err != nil {
				sc.t.Fatal(err)
			}
		}
		if r := h.Requirements(); len(r) > 0 {
			sc.t.Fatalf("the detached header is still marked: %v", r)
		}
		vk, _, err := h.Unlock([]byte("pw"))
		if err != nil {
			sc.t.Fatal(err)
		}
		want := int64(sc.H) * 512
		if sc.tcrypt {
			want = 0
		}
		if h.DataOffset() != want {
			sc.t.Fatalf("the detached header's data starts at byte %d, want %d", h.DataOffset(), want)
		}
		k := append([]byte(nil), vk.Bytes()...)
		vk.Wipe()
		if want := sc.rekeyTo.want(sc.key); len(k) != want.KeyBytes || bytes.Equal(k, sc.key[:min(len(sc.key), len(k))]) {
			sc.t.Fatalf("the detached header's key: %d bytes, equal to the old: %v", len(k), bytes.Equal(k, sc.key))
		}
		return k
	}
	k, err := os.ReadFile(sc.newKeyFile)
	if err != nil {
		sc.t.Fatal(err)
	}
	want := sc.rekeyTo.want(sc.key)
	if len(k) != want.KeyBytes || bytes.Equal(k, sc.key[:min(len(sc.key), len(k))]) {
		sc.t.Fatalf("new key file holds %d bytes (want %d), equal to the old key: %v", len(k), want.KeyBytes, bytes.Equal(k, sc.key))
	}
	if fi, err := os.Stat(sc.newKeyFile); err != nil || fi.Mode().Perm() != 0o600 {
		sc.t.Fatalf("new key file mode %v, %v", fi.Mode().Perm(), err)
	}
	return k
}

func (sc *scenario) verifyPlainRekeyed(w *fakeWorld, e *Engine) {
	sc.t.Helper()
	sc.w = w
	sc.verifyPlainFinal(w, e, sc.newPlainKey(), sc.rekeyTo.want(sc.key).Cipher, true, "after plain rekey")
	if sc.tcrypt {
		sc.verifyTCryptRemnants(w, true)
	}
}

func (sc *scenario) verifyPlainAborted(w *fakeWorld, e *Engine) {
	sc.t.Helper()
	if sc.plainOnDisk {
		// Nothing was written before the data.
		b := make([]byte, sc.H*512)
		if _, err := (fakeDiskIO{w: w, dev: sc.disk}).ReadAt(b, 0); err != nil {
			sc.t.Fatal(err)
		}
		if !bytes.Equal(b, make([]byte, len(b))) {
			sc.t.Fatal("an aborted conversion to LUKS2 changed the sectors before the data")
		}
	}
	sc.verifyPlainFinal(w, e, sc.key, "aes-xts-plain64", false, "after plain rekey abort")
	if sc.tcrypt {
		sc.verifyTCryptRemnants(w, false)
	}
}

func TestPlainRekeyEndToEnd(t *testing.T) {
	for i, rt := range []rekeyTarget{{}, cipherChange} {
		t.Run(fmt.Sprintf("%s/%d", rt.cipher, rt.bits), func(t *testing.T) {
			sc, w := plainWorld(t, int64(61+i))
			sc.rekeyTo = rt
			e := sc.engine(w)
			e.FailHook = func(string) { sc.write(w) }
			ep, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
			if err != nil {
				t.Fatal(err)
			}
			if n := len(ep.Spec.Forward.Phases); n != 3 || !ep.Spec.Forward.Phases[1].InPlace {
				t.Fatalf("plan: %v", ep.Spec.Forward.Phases)
			}
			if _, err := os.Stat(sc.newKeyFile); err == nil {
				t.Fatal("planning wrote the new key file")
			}
			if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
				t.Fatal(err)
			}
			if sc.writes == 0 {
				t.Fatal("the writer wrote nothing during the rekey")
			}
			sc.verifyPlainRekeyed(w, e)
			// The journal keeps digests, never the keys.
			raw, err := os.ReadFile(sc.journal)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(raw, sc.key) || bytes.Contains(raw, sc.newPlainKey()) {
				t.Fatal("the journal holds key material")
			}
		})
	}
}

// TestPlainToLUKS2EndToEnd: a plain volume under a writer becomes LUKS2
// with a detached header; while the run goes the header is marked (our
// reader sees the requirement), afterwards it opens with the passphrase.
func TestPlainToLUKS2EndToEnd(t *testing.T) {
	sc, w := plainLUKS2World(t, 67)
	e := sc.engine(w)
	marked := false
	e.FailHook = func(fp string) {
		sc.write(w)
		if fp != "rewrite:written" || marked {
			return
		}
		b, err := os.ReadFile(sc.plainHeader)
		if err != nil {
			t.Fatal(err)
		}
		h, err := luks.Read(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		marked = len(h.Requirements()) > 0
	}
	ep, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	if !marked {
		t.Fatal("the detached header was not marked in progress during the run")
	}
	sc.verifyPlainRekeyed(w, e)
	if info, _ := e.DM.Info("vda_crypt"); info.UUID != "CRYPT-PLAIN-vda_crypt" {
		t.Fatalf("the live mapping's uuid changed to %q (the kernel keeps a uuid once set)", info.UUID)
	}
}

func TestPlainRekeyRefusals(t *testing.T) {
	sc, w := plainWorld(t, 63)
	e := sc.engine(w)
	exists := filepath.Join(t.TempDir(), "exists.key")
	if err := os.WriteFile(exists, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		mod  func(*PlainRekeyOptions)
		want string
	}{
		{"unknown mapping", func(o *PlainRekeyOptions) { o.Target = "nosuch" }, "neither a device-mapper device"},
		{"no key file", func(o *PlainRekeyOptions) { o.NewKeyFile = "" }, "needs a file for its new key"},
		{"relative key file", func(o *PlainRekeyOptions) { o.NewKeyFile = "new.key" }, "must be an absolute path"},
		{"key file exists", func(o *PlainRekeyOptions) { o.NewKeyFile = exists }, "already exists"},
		{"bad key size", func(o *PlainRekeyOptions) { o.KeySize = 100 }, "not a multiple of 8"},
		{"cipher the kernel lacks", func(o *PlainRekeyOptions) { o.Cipher, o.KeySize = "twofish-xts-plain64", 256 }, "refuses cipher"},
		{"header without luks2", func(o *PlainRekeyOptions) { o.HeaderFile = "/tmp/x.hdr" }, "--header is for a conversion to LUKS2"},
		// Without --header the header would go before the data, where
		// this disk holds one already.
		{"luks2 without header", func(o *PlainRekeyOptions) { o.Type, o.NewKeyFile, o.Passphrase = "luks2", "", []byte("pw") }, "hold LUKS header"},
		{"luks2 without passphrase", func(o *PlainRekeyOptions) { o.Type, o.NewKeyFile, o.HeaderFile = "luks2", "", "/tmp/y.hdr" }, "needs a passphrase"},
		{"unknown type", func(o *PlainRekeyOptions) { o.Type = "luks3" }, "--type luks3"},
	} {
		o := sc.plainOptions()
		c.mod(&o)
		requireRefused(t, w, c.name, c.want, func() error {
			_, err := e.PlanPlainRekey(context.Background(), o)
			return err
		})
	}
	// A key file on a file system stored on the volume (an LV of its PV)
	// would be locked inside it.
	w.mu.Lock()
	lvDev := w.devs["vg-lv1"].dev
	w.mu.Unlock()
	host := e.Host.(*fakeHost)
	saved := host.fileDev
	host.fileDev = lvDev
	requireRefused(t, w, "key file on the volume", "would live on the volume being rekeyed", func() error {
		_, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
		return err
	})
	host.fileDev = saved
	// A LUKS mapping is not a plain one.
	w.mu.Lock()
	w.devs["vda_crypt"].uuid = "CRYPT-LUKS2-0123-vda_crypt"
	w.mu.Unlock()
	requireRefused(t, w, "luks", "not a plain dm-crypt mapping", func() error {
		_, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
		return err
	})
}

// TestPlainRekeyCrashAtEveryFailpoint: the plain rekey dies at every
// failpoint (a spread of hits), by process kill or power cut (with and
// without the disk's cache), then resume or abort finishes with every
// acknowledged write intact and the volume opening with exactly one key.
func TestPlainRekeyCrashAtEveryFailpoint(t *testing.T) {
	plainCrashMatrix(t, plainWorld, 64, 5000)
}

// The same matrix on a mapping whose IVs start at plainIVOffset: the
// helpers, the final table and a cold open keep the IV offset.
func TestPlainRekeyIVOffsetCrashAtEveryFailpoint(t *testing.T) {
	plainCrashMatrix(t, plainWorldIV, 66, 7000)
}

// TestPlainToLUKS2CrashAtEveryFailpoint: the same matrix for a plain
// volume turned into LUKS2 with a detached header: the new key comes back
// from the header (opened by the passphrase) on resume, and the header
// loses its in-progress mark only at the end.
func TestPlainToLUKS2CrashAtEveryFailpoint(t *testing.T) {
	plainCrashMatrix(t, plainLUKS2World, 66, 6000)
}

// TestPlainToLUKS2OnDiskEndToEnd: the header goes on the disk, before the
// data, at the end of the run only; nothing is there while it runs.
func TestPlainToLUKS2OnDiskEndToEnd(t *testing.T) {
	sc, w := plainLUKS2OnDiskWorld(t, 68)
	e := sc.engine(w)
	early := false
	e.FailHook = func(fp string) {
		sc.write(w)
		if fp == "rewrite:written" && sc.onDiskHeader(w) != nil {
			early = true
		}
	}
	ep, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	if early {
		t.Fatal("a LUKS2 header was on the disk while the data was being rewritten")
	}
	sc.verifyPlainRekeyed(w, e)
}

// TestPlainToLUKS2OnDiskCrashAtEveryFailpoint: the crash matrix of a
// plain volume turned into LUKS2 with its header on the disk: the journal
// keeps the header until the end; an abort leaves the sectors before the
// data as they were.
func TestPlainToLUKS2OnDiskCrashAtEveryFailpoint(t *testing.T) {
	plainCrashMatrix(t, plainLUKS2OnDiskWorld, 69, 7000)
}

// The header on the disk is refused where the sectors before the data
// hold something, or there are none.
func TestPlainToLUKS2OnDiskRefusals(t *testing.T) {
	sc, w := plainLUKS2World(t, 70) // its start holds the (fake) LUKS header of the world's making
	sc.plainHeader, sc.plainOnDisk = "", true
	e := sc.engine(w)
	requireRefused(t, w, "a header before the data", "hold LUKS header", func() error {
		_, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
		return err
	})
}

func plainCrashMatrix(t *testing.T, world rekeyWorld, seed, seedBase int64) {
	sc, w := world(t, seed)
	e := sc.engine(w)
	_, hits := sc.runUntil(e, w, "", 0, sc.planPlain(e))
	for _, fp := range []string{"rewrite:saved", "rewrite:written"} {
		if hits[fp] == 0 && !sc.tcrypt {
			t.Fatalf("the plain rekey never reached %s", fp)
		}
	}
	cases := 0
	for _, fp := range Failpoints {
		for _, nth := range occurrences(hits[fp]) {
			for _, rec := range []recovery{recoverResume, recoverAbort, recoverPowerResume, recoverLostCacheResume, recoverLostCacheAbort} {
				cases++
				seed := seedBase + int64(cases)
				t.Run(fmt.Sprintf("%s#%d/%s", fp, nth, rec), func(t *testing.T) {
					t.Parallel()
					plainCrashAndRecover(t, world, fp, nth, rec, seed)
				})
			}
		}
	}
	if cases == 0 {
		t.Fatal("the plain rekey reached no failpoint")
	}
	t.Logf("%d plain rekey crash cases", cases)
}

func plainCrashAndRecover(t *testing.T, world rekeyWorld, fp string, nth int, rec recovery, seed int64) {
	sc, w := world(t, seed)
	w, e := sc.crashEncrypted(t, w, fp, nth, rec, sc.planPlain)
	o := sc.plainResumeOptions()
	finished := func() {
		j, err := journal.Open(sc.journal, journal.Options{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		st, err := j.State()
		j.Close()
		if err != nil {
			t.Fatal(err)
		}
		switch st.Status {
		case journal.StatusDone:
			sc.verifyPlainRekeyed(w, e)
		case journal.StatusAborted:
			sc.verifyPlainAborted(w, e)
		default:
			t.Fatalf("journal status %s after an already-finished run", st.Status)
		}
	}
	if rec == recoverAbort || rec == recoverLostCacheAbort {
		err := sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Abort(context.Background(), o) })
		switch {
		case err == nil:
			sc.verifyPlainAborted(w, e)
		case strings.Contains(err.Error(), "already done"):
			finished()
		case errors.Is(err, ErrTooLateToAbort) && sc.plainOnDisk:
			// The header on the disk is being written: finish.
			if err := sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Resume(context.Background(), o) }); err != nil && !strings.Contains(err.Error(), "already done") {
				t.Fatalf("resume after a refused abort (%s#%d, %s): %v", fp, nth, rec, err)
			}
			finished()
		default:
			t.Fatalf("abort after a crash at %s#%d (%s): %v", fp, nth, rec, err)
		}
		return
	}
	if err := sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Resume(context.Background(), o) }); err != nil {
		if strings.Contains(err.Error(), "already done") {
			finished()
			return
		}
		t.Fatalf("resume after a crash at %s#%d (%s): %v", fp, nth, rec, err)
	}
	sc.verifyPlainRekeyed(w, e)
}

// A resume with the wrong old key is refused before anything is written.
func TestPlainRekeyResumeWrongOldKey(t *testing.T) {
	sc, w := plainWorld(t, 65)
	w, e := sc.poweredOffAt(w, "commit:after", 3, sc.planPlain)
	o := sc.plainResumeOptions()
	o.OldKey = func() ([]byte, error) { return make([]byte, 64), nil }
	sc.resumeRefused(w, e, o, "a wrong old key")
}

// poweredOffAt runs plan until the nth hit of fp, then cuts the power
// (the disk keeps what it acknowledged): what the next boot finds, and an
// engine on it.
func (sc *scenario) poweredOffAt(w *fakeWorld, fp string, nth int, plan func(*Engine) func() error) (*fakeWorld, *Engine) {
	sc.t.Helper()
	e := sc.engine(w)
	crashed, _ := sc.runUntil(e, w, fp, nth, plan(e))
	if crashed == nil {
		sc.t.Fatalf("never reached %s#%d", fp, nth)
	}
	crashed.powerCut(false)
	return crashed, sc.engine(crashed)
}

// resumeRefused: a resume with o fails as a wrong passphrase or key,
// before it creates any device.
func (sc *scenario) resumeRefused(w *fakeWorld, e *Engine, o ResumeOptions, what string) {
	sc.t.Helper()
	if err := e.Resume(context.Background(), o); !errors.Is(err, ErrWrongPassphrase) {
		sc.t.Fatalf("resume with %s: %v", what, err)
	}
	if len(w.devs) != 0 {
		sc.t.Fatalf("devices created by a refused resume: %v", w.devs)
	}
}

// TestPlainRekeyKeyringKey: a plain mapping whose table names a kernel
// keyring key. Without OldKey the plan is refused; a wrong old key is
// refused as a wrong key (checked against the live mapping, its probe
// device removed, nothing written); the right one plans and runs.
func TestPlainRekeyKeyringKey(t *testing.T) {
	sc, w := plainWorld(t, 64)
	e := sc.engine(w)
	addFakeKeyringKey("logon", "fake:"+t.Name(), sc.key)
	tbl, err := e.DM.Table("vda_crypt")
	if err != nil {
		t.Fatal(err)
	}
	tbl[0].Params.(*dmtable.Crypt).Key = dmtable.KeyringKey(len(sc.key), "logon", "fake:"+t.Name())
	for _, err := range []error{e.DM.Load("vda_crypt", tbl), e.DM.Suspend("vda_crypt"), e.DM.Resume("vda_crypt")} {
		if err != nil {
			t.Fatal(err)
		}
	}
	image := func() []byte {
		b := make([]byte, sc.N*512)
		if _, err := (fakeDiskIO{w: w, dev: sc.disk}).ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		return b
	}
	before := image()
	o := sc.plainOptions()
	if _, err := e.PlanPlainRekey(context.Background(), o); err == nil || !strings.Contains(err.Error(), "kernel keyring") {
		t.Fatalf("plan without the old key: %v, want a refusal naming the kernel keyring", err)
	}
	asked := 0
	wrong := bytes.Repeat([]byte{7}, len(sc.key))
	o.OldKey = func(n int) ([]byte, error) {
		asked++
		if n != len(sc.key) {
			t.Errorf("asked for a %d-byte old key, the table's is %d", n, len(sc.key))
		}
		return append([]byte(nil), wrong...), nil
	}
	if _, err := e.PlanPlainRekey(context.Background(), o); !errors.Is(err, ErrWrongPassphrase) || !strings.Contains(err.Error(), "vda_crypt") {
		t.Fatalf("plan with a wrong old key: %v, want a wrong-key error naming vda_crypt", err)
	}
	if asked != 1 {
		t.Fatalf("the old key was asked %d times", asked)
	}
	devs, err := e.DM.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if strings.HasPrefix(d.Name, "dmconvert-") {
			t.Fatalf("%s left after the key check", d.Name)
		}
	}
	if !bytes.Equal(before, image()) {
		t.Fatal("a refused plan changed the disk")
	}
	o.OldKey = func(int) ([]byte, error) { return append([]byte(nil), sc.key...), nil }
	ep, err := e.PlanPlainRekey(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	sc.verifyPlainRekeyed(w, e)
}

// TestPlanRefusesARunsDevices: a plain rekey killed mid-run leaves its
// helpers, crypt mappings of the disk with nothing on the disk to say
// whose they are. A new rekey or decrypt of the disk by its path, or of
// the mapping (restacked onto the helpers) by its name, is refused as the
// run's, naming its devices, and one of a helper by name as dmconvert's
// own device; nothing is written. Key checks left beside the
// user's mapping do not make the disk ambiguous, and the plan removes
// those whose process is gone.
func TestPlanRefusesARunsDevices(t *testing.T) {
	sc, w := plainWorld(t, 66)
	e := sc.engine(w)
	crashed, _ := sc.runUntil(e, w, "commit:after", 3, sc.planPlain(e))
	if crashed == nil {
		t.Fatal("the run never reached commit:after#3")
	}
	w = crashed
	e = sc.engine(w)
	var helper string
	for name, d := range w.devs {
		if strings.HasSuffix(name, "-old") && strings.HasPrefix(d.uuid, helperUUIDPrefix) {
			helper = name
		}
	}
	if helper == "" {
		t.Fatalf("no old-key helper among %v", w.devs)
	}
	sc.journal = filepath.Join(t.TempDir(), "second.journal")
	o := sc.plainOptions()
	o.Target = fakeDiskPath
	requireRefused(t, w, "rekey of the disk mid-run", "a dmconvert run's devices use it: "+strings.TrimSuffix(helper, "-old")+"-new, "+helper+";", func() error {
		_, err := e.PlanPlainRekey(context.Background(), o)
		return err
	})
	d := sc.decryptOptions()
	d.Target = fakeDiskPath
	requireRefused(t, w, "decrypt of the disk mid-run", "a dmconvert run's devices use it", func() error {
		_, err := e.PlanDecrypt(context.Background(), d)
		return err
	})
	o.Target = "vda_crypt"
	requireRefused(t, w, "rekey of the mapping mid-run", "vda_crypt: a dmconvert run is converting it (its devices: "+strings.TrimSuffix(helper, "-old")+"-new, "+helper+")", func() error {
		_, err := e.PlanPlainRekey(context.Background(), o)
		return err
	})
	d.Target = "vda_crypt"
	requireRefused(t, w, "decrypt of the mapping mid-run", "vda_crypt: a dmconvert run is converting it", func() error {
		_, err := e.PlanDecrypt(context.Background(), d)
		return err
	})
	o.Target = helper
	requireRefused(t, w, "rekey of a helper", "a private device of dmconvert", func() error {
		_, err := e.PlanPlainRekey(context.Background(), o)
		return err
	})

	sc, w = plainWorld(t, 67)
	e = sc.engine(w)
	tbl, err := e.DM.Table("vda_crypt")
	if err != nil {
		t.Fatal(err)
	}
	// Left by a killed plan (its PID gone), a running one's, and one
	// whose UUID names no PID.
	e.Host.(*fakeHost).gone = map[int]bool{999999: true}
	left := map[string]bool{}
	for _, c := range []struct {
		tag   string
		stays bool
	}{{"0123-pid999999", false}, {"4567-pid999998", true}, {"89ab", true}} {
		name := helperNamePrefix + c.tag + "-keycheck"
		if _, err := e.DM.Create(name, helperUUID(c.tag, "keycheck"), tbl); err != nil {
			t.Fatal(err)
		}
		left[name] = c.stays
	}
	o = sc.plainOptions()
	o.Target = fakeDiskPath
	p, err := e.PlanPlainRekey(context.Background(), o)
	if err != nil {
		t.Fatalf("rekey of the disk beside left-over key checks: %v", err)
	}
	if p.Spec.Name != "vda_crypt" {
		t.Fatalf("planned the rekey of %q, want vda_crypt", p.Spec.Name)
	}
	for name, stays := range left {
		if _, err := e.DM.Info(name); (err == nil) != stays {
			t.Errorf("%s: still there %v, want %v", name, err == nil, stays)
		}
	}
	for name, d := range w.devs {
		if _, known := left[name]; !known && strings.HasPrefix(d.uuid, helperUUIDPrefix) {
			t.Errorf("the plan left its own %s", name)
		}
	}
	_, uuid := transientDevice("cafe", "probe")
	if pid, ok := transientPID(uuid); !ok || pid != os.Getpid() {
		t.Errorf("transientPID(%q) = %d, %v; want this process's %d", uuid, pid, ok, os.Getpid())
	}
}

// TestPlansRefuseADiskARunHolds: while another process holds a disk's
// run lock (a run is going on there), every plan of it, by the disk's
// path or its mapping's name, is refused as busy, naming that process,
// before anything is shown or written: with the run's devices in place
// (not "a dmconvert run's devices use it ... resume or abort that run",
// which is for a stopped run) and before the run has made any.
func TestPlansRefuseADiskARunHolds(t *testing.T) {
	const want = "dmconvert process 4242 is working on it"
	busyRefusal := func(t *testing.T, w *fakeWorld, name string, plan func() error) {
		t.Helper()
		var err error
		requireRefused(t, w, name, want, func() error { err = plan(); return err })
		if !errors.Is(err, ErrBusy) {
			t.Fatalf("%s: %v is not ErrBusy", name, err)
		}
	}
	for _, running := range []bool{false, true} {
		sc, w := plainWorld(t, 68)
		e := sc.engine(w)
		if running {
			crashed, _ := sc.runUntil(e, w, "commit:after", 3, sc.planPlain(e))
			if crashed == nil {
				t.Fatal("the run never reached commit:after#3")
			}
			w = crashed
			e = sc.engine(w)
		}
		di, err := e.Host.Stat(fakeDiskPath)
		if err != nil {
			t.Fatal(err)
		}
		e.Host.(*fakeHost).holders = map[dmtable.Dev]int{di.Dev: 4242}
		sc.journal = filepath.Join(t.TempDir(), "second.journal")
		for _, target := range []string{fakeDiskPath, "vda_crypt"} {
			o := sc.plainOptions()
			o.Target = target
			busyRefusal(t, w, fmt.Sprintf("rekey of %s (run's devices in place: %v)", target, running), func() error {
				_, err := e.PlanPlainRekey(context.Background(), o)
				return err
			})
			d := sc.decryptOptions()
			d.Target = target
			busyRefusal(t, w, fmt.Sprintf("decrypt of %s (run's devices in place: %v)", target, running), func() error {
				_, err := e.PlanDecrypt(context.Background(), d)
				return err
			})
		}
		// This process's own lock (a resume planning its run) is not
		// another run's.
		e.Host.(*fakeHost).holders = map[dmtable.Dev]int{di.Dev: os.Getpid()}
		if !running {
			o := sc.plainOptions()
			o.Target = "vda_crypt"
			if _, err := e.PlanPlainRekey(context.Background(), o); err != nil {
				t.Fatalf("a plan beside this process's own lock: %v", err)
			}
		}
	}

	sc := newScenario(t, 72)
	w := sc.world()
	e := sc.engine(w)
	di, err := e.Host.Stat(fakeDiskPath)
	if err != nil {
		t.Fatal(err)
	}
	e.Host.(*fakeHost).holders = map[dmtable.Dev]int{di.Dev: 4242}
	busyRefusal(t, w, "encrypt", func() error {
		_, err := e.PlanEncrypt(context.Background(), sc.options())
		return err
	})
}

// TestDecryptRefusesWhatHasNoHeaderInFront: a decrypt (or a LUKS rekey)
// of a mapping whose LUKS header is not in front of its data says why,
// by what cryptsetup's dm UUID says the mapping is: a plain mapping, or
// LUKS opened with a detached header (its data from sector 0); nothing
// is written.
func TestDecryptRefusesWhatHasNoHeaderInFront(t *testing.T) {
	sc, w := plainWorld(t, 76)
	e := sc.engine(w)
	d := sc.decryptOptions()
	requireRefused(t, w, "decrypt of a plain mapping", "vda_crypt: a plain dm-crypt mapping (no LUKS header): dmconvert decrypts LUKS volumes; convert it to LUKS2 with the header on the disk first", func() error {
		_, err := e.PlanDecrypt(context.Background(), d)
		return err
	})
	tbl, err := e.DM.Table("vda_crypt")
	if err != nil {
		t.Fatal(err)
	}
	// As cryptsetup open --header maps it: the whole disk from sector 0.
	di, err := e.Host.Stat(fakeDiskPath)
	if err != nil {
		t.Fatal(err)
	}
	c := *tbl[0].Params.(*dmtable.Crypt)
	c.Offset = 0
	whole := dmtable.Table{{Start: 0, Length: dmtable.Sectors(di.Size), Params: &c}}
	for _, step := range []func() error{
		func() error { return e.DM.Load("vda_crypt", whole) },
		func() error { return e.DM.Suspend("vda_crypt") },
		func() error { return e.DM.Resume("vda_crypt") },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	// (The kernel sets a UUID once; the fake world is edited instead.)
	w.devs["vda_crypt"].uuid = "CRYPT-LUKS2-00112233445566778899aabbccddeeff-vda_crypt"
	requireRefused(t, w, "decrypt with a detached header", "vda_crypt: it was opened with a detached LUKS header (its data starts at sector 0 of "+fakeDiskPath+")", func() error {
		_, err := e.PlanDecrypt(context.Background(), d)
		return err
	})
	r := sc.rekeyOptions()
	requireRefused(t, w, "rekey with a detached header", "it was opened with a detached LUKS header", func() error {
		_, err := e.PlanRekey(context.Background(), r)
		return err
	})
}
