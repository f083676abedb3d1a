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
	"github.com/dmconvert/dmconvert/luks"
)

// TrueCrypt sources on the fake kernel: vda_crypt is opened as cryptsetup
// opens a TrueCrypt volume (its data at H with IVs from H, a TrueCrypt
// header at the start of the disk that the passphrase opens to the
// mapping's key, cryptsetup's CRYPT-TCRYPT- uuid) and carries a PV with
// LVs under a writer. It becomes LUKS2 with a detached header, its data
// moved to sector 0; crashes anywhere, then resume or abort.

const tcryptPass = "pw"

func tcryptWorld(t *testing.T, seed int64) (*scenario, *fakeWorld) {
	return tcryptWorldKeyfiles(t, seed, nil)
}

// tcryptWorldKeyfiles is tcryptWorld with a volume made with keyfiles
// (their contents; written to files the scenario names).
func tcryptWorldKeyfiles(t *testing.T, seed int64, kfs [][]byte) (*scenario, *fakeWorld) {
	t.Helper()
	sc, w := encryptedWorld(t, seed)
	n := sc.setIVOffset(w, sc.H)
	for i, kf := range kfs {
		p := filepath.Join(t.TempDir(), fmt.Sprintf("keyfile%d", i))
		if err := os.WriteFile(p, kf, 0o600); err != nil {
			t.Fatal(err)
		}
		sc.tcKeyfiles = append(sc.tcKeyfiles, p)
	}
	hdr, err := luks.CreateTCrypt(luks.TCryptParams{PRF: "sha512", Key: sc.key, DataOffset: int64(sc.H) * 512,
		DataSize: int64(n) * 512, VolumeSize: int64(n) * 512, Keyfiles: kfs}, []byte(tcryptPass))
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, sc.H*512)
	sc.rng.Read(head)
	copy(head, hdr)
	if _, err := (fakeDiskIO{w: w, dev: sc.disk}).WriteAt(head, 0); err != nil {
		t.Fatal(err)
	}
	w.mu.Lock()
	w.devs["vda_crypt"].uuid = tcryptUUIDPrefix + "vda_crypt"
	w.mu.Unlock()
	sc.plainHeader = filepath.Join(t.TempDir(), "vda.hdr")
	sc.tcrypt, sc.tcHead = true, head
	return sc, w
}

// verifyTCryptRemnants: after the conversion nothing of the old volume
// is left after the new data area (the last chunk's old ciphertext, the
// backup headers); after an abort the header area is back as it was and
// the passphrase opens it to the old key.
func (sc *scenario) verifyTCryptRemnants(w *fakeWorld, rekeyed bool) {
	sc.t.Helper()
	d := fakeDiskIO{w: w, dev: sc.disk}
	if rekeyed {
		size := sc.N - sc.H
		tail := make([]byte, (sc.N-size)*512)
		if _, err := d.ReadAt(tail, int64(size)*512); err != nil {
			sc.t.Fatal(err)
		}
		if !bytes.Equal(tail, make([]byte, len(tail))) {
			sc.t.Fatalf("the %d sectors after the converted data are not zeroed", sc.N-size)
		}
		return
	}
	head := make([]byte, len(sc.tcHead))
	if _, err := d.ReadAt(head, 0); err != nil {
		sc.t.Fatal(err)
	}
	if !bytes.Equal(head, sc.tcHead) {
		sc.t.Fatal("an abort left the TrueCrypt header area changed")
	}
	h, err := luks.OpenTCrypt(head, []byte(tcryptPass))
	if err != nil || !bytes.Equal(h.Key, sc.key) {
		sc.t.Fatalf("the restored TrueCrypt header does not open to the old key: %v", err)
	}
}

func TestTCryptToLUKS2EndToEnd(t *testing.T) {
	sc, w := tcryptWorld(t, 71)
	e := sc.engine(w)
	e.FailHook = func(string) { sc.write(w) }
	ep, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
	if err != nil {
		t.Fatal(err)
	}
	p := ep.Spec.Forward
	if len(p.Phases) != 3 || p.Phases[1].InPlace || p.Phases[1].Chunk != plainChunk || !ep.Spec.TCrypt || ep.Spec.Crypt.IVOffset != 0 || ep.Spec.OldCrypt.IVOffset != sc.H {
		t.Fatalf("plan: %+v, crypt %+v, old %+v", p.Phases, ep.Spec.Crypt, ep.Spec.OldCrypt)
	}
	if err := e.Execute(context.Background(), ep, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	if sc.writes == 0 {
		t.Fatal("the writer wrote nothing during the conversion")
	}
	sc.verifyPlainRekeyed(w, e)
	raw, err := os.ReadFile(sc.journal)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, sc.key) || bytes.Contains(raw, sc.newPlainKey()) {
		t.Fatal("the journal holds key material")
	}
}

func TestTCryptRefusals(t *testing.T) {
	sc, w := tcryptWorld(t, 72)
	e := sc.engine(w)
	for _, c := range []struct {
		name string
		mod  func(*PlainRekeyOptions)
		want string
	}{
		{"no header", func(o *PlainRekeyOptions) { o.HeaderFile = "" }, "detached header only"},
		{"plain type", func(o *PlainRekeyOptions) { o.Type = "plain" }, "converted to LUKS2 only"},
		{"wrong passphrase", func(o *PlainRekeyOptions) { o.Passphrase = []byte("nope") }, "does not open the TrueCrypt"},
		{"no passphrase", func(o *PlainRekeyOptions) { o.Passphrase = nil }, "needs a passphrase"},
	} {
		o := sc.plainOptions()
		c.mod(&o)
		requireRefused(t, w, c.name, c.want, func() error {
			_, err := e.PlanPlainRekey(context.Background(), o)
			return err
		})
	}
	// The type defaults to luks2 for a TrueCrypt source.
	o := sc.plainOptions()
	o.Type = ""
	ep, err := e.PlanPlainRekey(context.Background(), o)
	if err != nil || ep.Spec.PlainTo != "luks2" {
		t.Fatalf("a TrueCrypt source without --type: %v", err)
	}
	ep.Wipe()
	// A mapping whose key is not the header's (another volume's header).
	other := append([]byte(nil), sc.tcHead...)
	hdr, err := luks.CreateTCrypt(luks.TCryptParams{PRF: "sha512", Key: bytes.Repeat([]byte{7}, 64), DataOffset: int64(sc.H) * 512,
		DataSize: int64(sc.N-sc.H) * 512, VolumeSize: int64(sc.N-sc.H) * 512}, []byte(tcryptPass))
	if err != nil {
		t.Fatal(err)
	}
	copy(other, hdr)
	if _, err := (fakeDiskIO{w: w, dev: sc.disk}).WriteAt(other, 0); err != nil {
		t.Fatal(err)
	}
	requireRefused(t, w, "another key", "does not hold the key", func() error {
		_, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
		return err
	})
	if _, err := (fakeDiskIO{w: w, dev: sc.disk}).WriteAt(sc.tcHead, 0); err != nil {
		t.Fatal(err)
	}
	// IVs not from the data offset: not how cryptsetup maps TrueCrypt.
	tbl, _ := e.DM.Table("vda_crypt")
	tbl[0].Params.(*dmtable.Crypt).IVOffset = 0
	for _, err := range []error{e.DM.Load("vda_crypt", tbl), e.DM.Suspend("vda_crypt"), e.DM.Resume("vda_crypt")} {
		if err != nil {
			t.Fatal(err)
		}
	}
	requireRefused(t, w, "iv offset", "not how cryptsetup maps a TrueCrypt volume", func() error {
		_, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
		return err
	})
	// Offset 0 with the IVs from the data offset: how cryptsetup maps the
	// outer ciphers of a cascade.
	tbl[0].Params.(*dmtable.Crypt).IVOffset = dmtable.Sectors(sc.H)
	tbl[0].Params.(*dmtable.Crypt).Offset = 0
	for _, err := range []error{e.DM.Load("vda_crypt", tbl), e.DM.Suspend("vda_crypt"), e.DM.Resume("vda_crypt")} {
		if err != nil {
			t.Fatal(err)
		}
	}
	requireRefused(t, w, "cascade", "cipher cascade", func() error {
		_, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
		return err
	})
}

// TestTCryptToLUKS2CrashAtEveryFailpoint: the conversion dies at every
// failpoint (a spread of hits), by process kill or power cut (with and
// without the disk's cache), then resume or abort finishes with every
// acknowledged write intact: converted (data at 0 under the new key, the
// detached header no longer marked, the old volume's remnants zeroed) or
// back to the TrueCrypt volume (its header area restored).
func TestTCryptToLUKS2CrashAtEveryFailpoint(t *testing.T) {
	plainCrashMatrix(t, tcryptWorld, 73, 8000)
}

// After a reboot no table shows the old key: resume gets it from the
// header area the journal kept, with the passphrase; a wrong one is
// refused before anything is written.
func TestTCryptResumeAfterReboot(t *testing.T) {
	sc, w := tcryptWorld(t, 74)
	w, e := sc.poweredOffAt(w, "commit:after", 5, sc.planPlain)
	o := sc.plainResumeOptions()
	o.OldKey = func() ([]byte, error) {
		return nil, errors.New("the old key must come from the journal's TrueCrypt header")
	}
	bad := o
	bad.Passphrase = []byte("nope")
	sc.resumeRefused(w, e, bad, "a wrong passphrase")
	if err := e.Resume(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	sc.verifyPlainRekeyed(w, e)
}

// A volume made with keyfiles: refused without them (nothing written);
// converted with them; after a reboot the resume reads them again from
// the paths the run recorded (refused while one is missing).
func TestTCryptKeyfiles(t *testing.T) {
	sc, w := tcryptWorldKeyfiles(t, 75, [][]byte{[]byte("first keyfile"), bytes.Repeat([]byte{9}, 3000)})
	e := sc.engine(w)
	kfs := sc.tcKeyfiles
	sc.tcKeyfiles = kfs[:1]
	requireRefused(t, w, "one keyfile missing", "does not open the TrueCrypt", func() error {
		_, err := e.PlanPlainRekey(context.Background(), sc.plainOptions())
		return err
	})
	sc.tcKeyfiles = kfs
	w, e = sc.poweredOffAt(w, "commit:after", 5, sc.planPlain)
	o := sc.plainResumeOptions()
	o.OldKey = func() ([]byte, error) {
		return nil, errors.New("the old key must come from the journal's TrueCrypt header")
	}
	moved := kfs[1] + ".moved"
	if err := os.Rename(kfs[1], moved); err != nil {
		t.Fatal(err)
	}
	if err := e.Resume(context.Background(), o); err == nil || !strings.Contains(err.Error(), "keyfile") {
		t.Fatalf("resume without a keyfile: %v", err)
	}
	if err := os.Rename(moved, kfs[1]); err != nil {
		t.Fatal(err)
	}
	if err := e.Resume(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	sc.verifyPlainRekeyed(w, e)
}
