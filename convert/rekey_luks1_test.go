package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/luks"
)

// Rekey of a LUKS1 volume on the fake kernel, with real LUKS1 headers
// (the luks package and LUKSHeader, not the fake header): the disk is
// encrypted by a fake-kernel run of encrypt with a LUKS1 header (256-bit
// aes-xts-plain64 key, so 8 keyslots of 250 sectors end at sector 2050),
// then rekeyed under a writer, crashed anywhere, resumed or aborted; the
// header left on the disk must open with the passphrase (our reader) to
// the key the data is encrypted with, at the data offset it is at, and
// the old key must not open a rekeyed one.

const (
	luks1Pass = "pw"
	// luks1H: keyslot material to 2050, records to 2064, then room for
	// a 128-sector gap and more.
	luks1H Sectors = 2560
	// luks1N holds the PV (3800) plus two headers for the encrypt.
	luks1N Sectors = 9216
	// luks1Gap is the gap (and chunk) of the LUKS1 rekeys: 52 chunks.
	luks1Gap Sectors = 128
)

func luks1Opener(img []byte) (HeaderFormat, Keys, error) {
	h, ks, err := OpenLUKSImage(img, []byte(luks1Pass))
	if err != nil {
		return nil, Keys{}, err
	}
	return h, ks, nil
}

// luks1EncryptedWorld is encryptedWorld with a real LUKS1 header.
func luks1EncryptedWorld(t *testing.T, seed int64) (*scenario, *fakeWorld) {
	t.Helper()
	sc := newScenario(t, seed)
	sc.luks1, sc.H, sc.N, sc.key = true, luks1H, luks1N, sc.key[:32]
	w := sc.world()
	e := sc.engine(w)
	o := sc.options()
	o.KeyBytes = 32
	o.NewHeader = func(key []byte, ss uint32) (HeaderFormat, error) {
		copy(key, sc.key)
		vk := luks.NewVolumeKeyFromBytes(key)
		defer vk.Wipe()
		h, err := luks.Create(luks.Options{Version: 1, Cipher: "aes-xts-plain64", HeaderSize: int64(sc.H) * 512,
			PBKDF: luks.PBKDF{Type: luks.KDFPBKDF2, Iterations: luks.MinPBKDF2Iterations}}, vk, []byte(luks1Pass))
		if err != nil {
			return nil, err
		}
		return NewLUKSHeader(h)
	}
	ep, err := e.PlanEncrypt(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	sc.journal = fastTempDir(t) + "/rekey.journal"
	return sc, w
}

// markOnly are the failpoints only a rekey or a decrypt reaches (an
// encrypt marks no header: it writes a new one); their matrices cover
// them, TestLUKS1TornMarkIsRedone each write of a LUKS1 mark.
var markOnly = map[string]bool{"mark:part-written": true}

// TestLUKS1TornMarkIsRedone: a LUKS1 rekey's mark is several writes (the
// staged keyslot, the checkpoint record, the disguised first block).
// After a crash (or a power cut) between any two of them, resume must
// finish the mark before any chunk moves: the disk shows the disguised
// header (stock cryptsetup opens nothing) at every chunk of the run, and
// the end is the rekeyed volume. Before the fix, a record written before
// the crash let reconcile take the mark as done: the whole run went on
// under the original, openable header with the old key.
func TestLUKS1TornMarkIsRedone(t *testing.T) {
	sc0, w0 := luks1EncryptedWorld(t, 61)
	e0 := sc0.engine(w0)
	_, hits := sc0.runUntil(e0, w0, "", 0, sc0.planRekey(e0))
	n := hits["mark:part-written"]
	if n < 3 {
		t.Fatalf("a LUKS1 rekey's mark wrote %d parts, want at least 3 (keyslot, record, first block)", n)
	}
	for nth := 1; nth <= n; nth++ {
		for _, rec := range []recovery{recoverResume, recoverPowerResume, recoverLostCacheResume} {
			t.Run(fmt.Sprintf("part%d/%s", nth, rec), func(t *testing.T) {
				t.Parallel()
				sc, w := luks1EncryptedWorld(t, 61+int64(nth))
				w, e := sc.crashEncrypted(t, w, "mark:part-written", nth, rec, sc.planRekey)
				disk := fakeDiskIO{w: w, dev: sc.disk}
				chunks := 0
				e.FailHook = func(name string) {
					sc.write(w)
					if name != "sync:after" && name != "rewrite:saved" {
						return
					}
					chunks++
					first := make([]byte, 4096)
					disk.ReadAt(first, 0)
					if id := Identify(first); id != IdentityDisguisedLUKS1 {
						t.Fatalf("a chunk moves (%s) while the disk shows %v, not the disguised header", name, id)
					}
				}
				if err := e.Resume(context.Background(), ResumeOptions{Journal: sc.journal, Open: sc.rekeyOpener()}); err != nil {
					t.Fatalf("resume after a crash at mark:part-written#%d (%s): %v", nth, rec, err)
				}
				if chunks == 0 {
					t.Fatal("the resumed run moved no chunk")
				}
				sc.verifyRekeyed(w, e)
			})
		}
	}
}

type luks1State int

const (
	luks1Other    luks1State = iota // disguised, torn, or no key fits
	luks1Original                   // the old key at H
	luks1Rekeyed                    // a new key at H-G
)

// luks1Header reads the header on the disk the way cryptsetup would use
// it (plain LUKS1 magic, no staged key, no checkpoint records), unlocks
// it with the passphrase and says which volume it describes.
func (sc *scenario) luks1Header(w *fakeWorld) (luks1State, []byte, Sectors, *luks.Header) {
	disk := fakeDiskIO{w: w, dev: sc.disk}
	first := make([]byte, 4096)
	disk.ReadAt(first, 0)
	h, err := luks.Read(disk)
	if Identify(first) != IdentityLUKS || err != nil || h.Version() != 1 || h.Disguised() || h.StagedKeyslot() >= 0 {
		return luks1Other, nil, 0, nil
	}
	if _, err := h.LoadCheckpoint(disk); !errors.Is(err, luks.ErrNoCheckpoint) {
		return luks1Other, nil, 0, nil
	}
	vk, _, err := h.Unlock([]byte(luks1Pass))
	if err != nil {
		return luks1Other, nil, 0, nil
	}
	key := append([]byte(nil), vk.Bytes()...)
	vk.Wipe()
	off := Sectors(h.DataOffset() / 512)
	switch {
	case bytes.Equal(key, sc.key) && off == sc.H:
		return luks1Original, key, off, h
	case !bytes.Equal(key, sc.key) && off == sc.rekeyedOffset() && h.Cipher() == sc.luks1Want(true).Cipher && len(key) == sc.luks1Want(true).KeyBytes:
		return luks1Rekeyed, key, off, h
	}
	return luks1Other, key, off, h
}

// luks1Want is the data's cipher and key size of the LUKS1 volume,
// rekeyed or not: the original is aes-xts-plain64 with the 256-bit key.
func (sc *scenario) luks1Want(rekeyed bool) CryptSpec {
	if !rekeyed {
		return CryptSpec{Cipher: "aes-xts-plain64", KeyBytes: len(sc.key), SectorSize: 512}
	}
	return sc.rekeyTo.want(sc.key)
}

func (sc *scenario) luks1Final(w *fakeWorld) luks1State {
	s, _, _, _ := sc.luks1Header(w)
	return s
}

// verifyLUKS1 checks the end of a LUKS1 rekey (rekeyed) or of its abort:
// the LVs through the live stack, nothing of the run left, the header on
// the disk (see luks1Header; a rekeyed one with one keyslot, which the
// old key does not verify against), F's table as cryptsetup would load
// it from that header, and a fresh boot that opens the disk with it.
func (sc *scenario) verifyLUKS1(w *fakeWorld, e *Engine, rekeyed bool) {
	sc.t.Helper()
	want := luks1Original
	if rekeyed {
		want = luks1Rekeyed
	}
	st, key, off, h := sc.luks1Header(w)
	if st != want {
		sc.t.Fatalf("the header on the disk is not the %s LUKS1 header (state %d, data at %d)", map[bool]string{true: "rekeyed", false: "original"}[rekeyed], st, off)
	}
	if rekeyed {
		if err := h.VerifyVolumeKey(luks.NewVolumeKeyFromBytes(sc.key)); !errors.Is(err, luks.ErrWrongKey) {
			sc.t.Fatalf("the old key against the rekeyed header: %v", err)
		}
		want := 1
		if sc.alsoPass != "" {
			want = 2
			if vk, _, err := h.Unlock([]byte(sc.alsoPass)); err != nil || !bytes.Equal(vk.Bytes(), key) {
				sc.t.Fatalf("the passphrase kept does not open the new key: %v", err)
			}
		}
		if ks := h.Keyslots(); len(ks) != want {
			sc.t.Fatalf("the rekeyed header has %d keyslots, want %d", len(ks), want)
		}
	} else if sc.alsoPass != "" {
		if vk, _, err := h.Unlock([]byte(sc.alsoPass)); err != nil || !bytes.Equal(vk.Bytes(), key) {
			sc.t.Fatalf("the other passphrase does not open the old key after the abort: %v", err)
		}
	}
	if _, err := e.DM.Info("vda_crypt"); err == nil || len(w.devs) > 0 {
		sc.verifyLVs(w, "after the LUKS1 rekey")
		list, _ := e.DM.List()
		if len(list) != 1+len(sc.lvs) {
			sc.t.Fatalf("devices left after the LUKS1 rekey: %v", list)
		}
		t, err := e.DM.Table("vda_crypt")
		if err != nil {
			sc.t.Fatal(err)
		}
		c, ok := t[0].Params.(*dmtable.Crypt)
		if len(t) != 1 || !ok || Sectors(c.Offset) != off || !c.Key.Equal(dmtable.HexKey(key)) || string(c.Cipher) != sc.luks1Want(rekeyed).Cipher || Sectors(t[0].Length) != sc.N-off {
			sc.t.Fatalf("vda_crypt's table does not match the header: %v", t)
		}
	}
	// Fresh boot: nothing on the raw disk; the header's key and offset
	// give back every LV.
	sc.coldOpen(w, off, sc.luks1Want(rekeyed).Cipher, key, "fresh boot after the LUKS1 rekey")
}

// addLUKS1Keyslots adds keyslots opened by pass to the header on the
// disk (as cryptsetup luksAddKey would).
func (sc *scenario) addLUKS1Keyslots(t *testing.T, w *fakeWorld, pass string, n int) {
	t.Helper()
	disk := fakeDiskIO{w: w, dev: sc.disk}
	h, err := luks.Read(disk)
	if err != nil {
		t.Fatal(err)
	}
	vk := luks.NewVolumeKeyFromBytes(sc.key)
	defer vk.Wipe()
	for i := 0; i < n; i++ {
		if _, err := h.AddKeyslot(vk, []byte(pass), luks.PBKDF{Type: luks.KDFPBKDF2, Iterations: luks.MinPBKDF2Iterations}); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Commit(disk); err != nil {
		t.Fatal(err)
	}
	disk.Flush()
}

// TestRekeyLUKS1EndToEnd: a LUKS1 volume with a second passphrase is
// refused until RemoveOtherKeyslots, then rekeyed under a writer; the
// passphrase given opens the new key, the other one nothing.
func TestRekeyLUKS1EndToEnd(t *testing.T) {
	sc, w := luks1EncryptedWorld(t, 31)
	sc.addLUKS1Keyslots(t, w, "other", 1)
	e := sc.engine(w)
	requireRefused(t, w, "other keyslots", "keyslot 1 is not opened", func() error {
		_, err := e.PlanRekey(context.Background(), sc.rekeyOptions())
		return err
	})
	e.FailHook = func(string) { sc.write(w) }
	o := sc.rekeyOptions()
	o.RemoveOtherKeyslots = true
	ep, err := e.PlanRekey(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if ep.Spec.LUKSVersion != 1 || ep.Spec.Crypt != ep.Spec.OldCrypt || ep.Spec.Forward.Geometry.HeaderUsed != sc.H-luks1Gap {
		t.Fatalf("plan: LUKS%d, crypt %+v -> %+v, data to %d", ep.Spec.LUKSVersion, ep.Spec.OldCrypt, ep.Spec.Crypt, ep.Spec.Forward.Geometry.HeaderUsed)
	}
	if note := OtherKeyslotsNote(ep.Header); note != "keyslot 1 is removed (their passphrases were not given)" {
		t.Fatalf("plan note: %q", note)
	}
	if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	if sc.writes == 0 {
		t.Fatal("the writer wrote nothing during the rekey")
	}
	sc.verifyRekeyed(w, e)
	_, _, _, h := sc.luks1Header(w)
	if _, _, err := h.Unlock([]byte("other")); !errors.Is(err, luks.ErrWrongPassphrase) {
		t.Fatalf("the passphrase that was not given after the rekey: %v", err)
	}
	// What the gap did not use is left for later rekeys: a second one
	// plans (the data is at 2432 now, the keyslot material and the
	// records end at 2064).
	if ep, err := e.PlanRekey(context.Background(), RekeyOptions{Target: "vda_crypt", Journal: sc.journal + "2", Chunk: luks1Gap, Open: luks1Opener, Passphrase: []byte(luks1Pass)}); err != nil {
		t.Fatalf("a second rekey: %v", err)
	} else {
		ep.Wipe()
	}
}

// TestRekeyLUKS1Refusals: a cipher or key size change and no free keyslot
// are refused at plan time, naming the disk and the reason,
// with nothing written and no device left.
func TestRekeyLUKS1Refusals(t *testing.T) {
	sc, w := luks1EncryptedWorld(t, 32)
	e := sc.engine(w)
	before, _ := e.DM.List()
	for _, c := range []struct {
		name string
		mod  func(*RekeyOptions)
		want string
	}{
		// Refused by the (fake) kernel here; by dmconvert (LUKS1 keyslots
		// use the data's cipher, and it does not run Camellia) where the
		// kernel has it.
		{"cipher", func(o *RekeyOptions) { o.Cipher = "camellia-xts-plain64" }, "cipher camellia-xts-plain64"},
		{"key size", func(o *RekeyOptions) { o.KeySize = 512 }, "the keyslots of a 512-bit key end at sector 4036, after the data at 2560"},
	} {
		o := sc.rekeyOptions()
		c.mod(&o)
		requireRefused(t, w, c.name, c.want, func() error {
			_, err := e.PlanRekey(context.Background(), o)
			var re *RefusalError
			if err != nil && (!errors.As(err, &re) || re.Device != fakeDiskPath) {
				t.Errorf("%s: not a refusal naming %s: %v", c.name, fakeDiskPath, err)
			}
			return err
		})
	}
	// Same cipher and size, given explicitly: accepted.
	o := sc.rekeyOptions()
	o.Cipher, o.KeySize = "aes-xts-plain64", 256
	ep, err := e.PlanRekey(context.Background(), o)
	if err != nil {
		t.Fatalf("the volume's own cipher and key size: %v", err)
	}
	ep.Wipe()
	// Less room than the engine's MinRekeyGap (as a 512-bit key's 24
	// KiB are on a real disk): the data is rewritten in place, at the
	// same offset.
	ei := sc.engine(w)
	ei.MinRekeyGap = 4096
	if ep, err := ei.PlanRekey(context.Background(), sc.rekeyOptions()); err != nil {
		t.Fatalf("a rekey with no room to move: %v", err)
	} else {
		g, ph := ep.Spec.Forward.Geometry, ep.Spec.Forward.Phases
		if len(ph) != 4 || ph[1].Kind != PhaseMark || !ph[2].InPlace || ph[2].Chunk != luks1Gap || g.HeaderUsed != sc.H {
			t.Fatalf("a rekey with no room to move plans %v (header used to %d)", ph, g.HeaderUsed)
		}
		ep.Wipe()
	}
	// Every keyslot in use: the new key has nowhere to wait, even when
	// the others may go.
	sc.addLUKS1Keyslots(t, w, luks1Pass, 7)
	o = sc.rekeyOptions()
	o.RemoveOtherKeyslots = true
	requireRefused(t, w, "all keyslots in use", "all 8 LUKS1 keyslots are in use", func() error {
		_, err := e.PlanRekey(context.Background(), o)
		return err
	})
	if after, _ := e.DM.List(); len(after) != len(before) {
		t.Fatalf("devices before %v, after %v", before, after)
	}
}

// TestRekeyLUKS1CrashAtEveryFailpoint: the crash matrix of
// TestRekeyCrashAtEveryFailpoint on a real LUKS1 header: every failpoint
// at a spread of hits, then resume, abort, power cut and resume, lost
// cache and resume or abort; every write is there, and the header left
// opens with the passphrase to the key of the data (a rekeyed one not
// with the old key).
func TestRekeyLUKS1CrashAtEveryFailpoint(t *testing.T) {
	rekeyCrashMatrixOn(t, luks1EncryptedWorld, rekeyTarget{}, 33, 4000)
}

// TestRekeyLUKS1KeepTwoCrashAtEveryFailpoint: the LUKS1 crash matrix of
// a rekey that keeps a second passphrase (--also-key-file): the new key
// staged in two keyslots, every recovery opening the journal's header
// with the second passphrase alone; in place, so that the staged
// keyslots and the records share the header with no gap.
func TestRekeyLUKS1KeepTwoCrashAtEveryFailpoint(t *testing.T) {
	world := func(t *testing.T, seed int64) (*scenario, *fakeWorld) {
		sc, w := luks1EncryptedWorld(t, seed)
		sc.addLUKS1Keyslots(t, w, "other", 1)
		sc.alsoPass, sc.inPlace = "other", true
		return sc, w
	}
	rekeyCrashMatrixOn(t, world, rekeyTarget{}, 37, 8000)
}

// TestRekeyLUKS1CipherChangeCrashAtEveryFailpoint: the LUKS1 crash
// matrix of a rekey to another cipher and key size (aes-xts-plain64 with
// a 256-bit key to aes-cbc-essiv:sha256 with 128 bits): the staged key
// encrypted with the new cipher in the 128-bit layout's keyslot 2 (clear
// of keyslot 0 in use), the switch moving every keyslot to that layout;
// in place. The fake kernel's ciphers differ, so a table with the wrong
// one anywhere loses data.
func TestRekeyLUKS1CipherChangeCrashAtEveryFailpoint(t *testing.T) {
	rekeyCrashMatrixOn(t, inPlaceWorld(luks1EncryptedWorld), rekeyTarget{cipher: "aes-cbc-essiv:sha256", bits: 128}, 38, 9000)
}

// TestRekeyLUKS1InPlaceCrashAtEveryFailpoint: the LUKS1 crash matrix for
// a rekey in place (what a LUKS1 header with a 512-bit key, 24 KiB of
// room, gets): the staged keyslot and disguised header of the gap's
// rekey, the chunks rewritten where they are with their old ciphertext
// in the journal; the data offset stays.
func TestRekeyLUKS1InPlaceCrashAtEveryFailpoint(t *testing.T) {
	rekeyCrashMatrixOn(t, inPlaceWorld(luks1EncryptedWorld), rekeyTarget{}, 35, 6000)
}
