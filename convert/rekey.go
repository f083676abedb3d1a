package convert

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// Online rekey of a LUKS2 or LUKS1 volume (docs/design.md section 8).
//
// The dm mirror cannot re-encrypt sectors in place: its two legs would be
// the same disk sectors under two keys, and a crash between the legs'
// writes would leave sectors no key decrypts. So the data area moves, by
// a small gap G, toward the start of the disk, into the unused end of the
// keyslots area: chunk k is mirrored from the old key's mapping at offset
// H onto the new key's mapping at offset H-G. A chunk never exceeds G, so
// a chunk's destination only overlaps sectors whose data was already
// copied (and committed) by the chunks before it, exactly as encrypt's
// moving gap; the old ciphertext of the chunk in flight is never
// overwritten before the journal says the chunk is done. The header stays
// valid and marked in progress (a LUKS2 requirement: stock cryptsetup
// refuses it) with the new key waiting in an unbound keyslot opened by the
// same passphrase; the last step binds the data segment to the new key,
// sets the data offset to H-G, and removes the old key's keyslots. A LUKS1
// header is disguised instead (its magic replaced) and the new key waits
// in a free keyslot, named by a record in the disguised phdr (luks
// package, rekey1.go); a new LUKS1 cipher or key size rekeys in place
// and moves every keyslot to the new key size's layout at the end.

// RekeyOptions are the inputs of PlanRekey.
type RekeyOptions struct {
	// Target is the open LUKS2 or LUKS1 mapping (its name or
	// /dev/mapper path) or the device under it.
	Target string
	// Journal path; default DefaultJournalDir/<LUKS UUID>.journal.
	Journal string
	// Chunk is the gap the data moves by, and so the largest chunk
	// (sectors); 0 means 4 MiB. It is capped by the unused end of the
	// keyslots area.
	Chunk Sectors
	// Open unlocks the header with the user's passphrase or key file.
	Open HeaderOpener
	// Passphrase is what Open used: the new key's keyslot is opened by it.
	Passphrase []byte
	// AlsoPassphrases are further passphrases or key files of the volume
	// that keep working: each must open a keyslot of its own, and
	// the new key gets a keyslot opened by each.
	AlsoPassphrases [][]byte
	// RemoveOtherKeyslots allows keyslots the passphrase does not open
	// to be removed (they hold the old key, which stops being of use).
	RemoveOtherKeyslots bool
	// Cipher is the new key's cipher spec (dm-crypt/cryptsetup form,
	// e.g. serpent-xts-plain64); empty keeps the source's.
	Cipher string
	// KeySize is the new key's size in bits; 0 keeps the source's.
	KeySize int
	// InPlace rewrites the data where it is (docs/design.md section 8,
	// "In place") even when the keyslots area leaves room to move it;
	// without room (less than Engine.MinRekeyGap) a rekey is in place
	// anyway. Chunk is then the rewrite's step, 0 meaning
	// DefaultPlainChunk.
	InPlace bool
}

// DefaultMinRekeyGap is the smallest gap a rekey moves the data by: with
// less room before the data a chunk's fixed cost (journal commit, table
// swap, the mirror's start) outweighs its copy, and the in-place rewrite,
// which needs no room at all, is faster.
const DefaultMinRekeyGap Sectors = 512 << 10 / 512

// DefaultRekeyGap is the default distance the data moves in a rekey.
const DefaultRekeyGap Sectors = 4 << 20 / 512

// Rekeyable is a header a rekey can stage its new key in.
type Rekeyable interface {
	// StageRekey adds an unbound keyslot holding newKey, the data's key
	// once the data segment is encrypted with cipher, opened by pass with
	// the key derivation of the keyslot pass opened (LUKS1: a staged key
	// in a free keyslot, same cipher and key size only).
	StageRekey(newKey, pass []byte, cipher string) error
	// KeyslotsEnd is the sector after the last keyslot area in use.
	KeyslotsEnd() Sectors
	// OtherKeyslots lists the keyslots pass does not open.
	OtherKeyslots() []int
}

// KeyslotKeeper is a Rekeyable header that keeps several passphrases
// through a rekey (LUKS2, LUKS1): AddOpener, before StageRekey, checks that a
// further passphrase opens a keyslot of its own; StageRekeyAlso, after
// it, gives the new key a keyslot opened by the i-th one.
type KeyslotKeeper interface {
	AddOpener(pass []byte) (slot int, err error)
	StageRekeyAlso(newKey, pass []byte, i int, cipher string) error
}

// ErrNotPV classifies refusals because a device is not an LVM PV.
var ErrNotPV = errors.New("not an LVM physical volume")

// PlanRekey inspects an open LUKS mapping (a file system on it, or an
// LVM PV with live LVs) and returns a verified rekey plan, the new key
// already staged in the header image the journal will hold. It writes
// nothing.
func (e *Engine) PlanRekey(ctx context.Context, o RekeyOptions) (*EncryptPlan, error) {
	// What LVM has on the mapping is asked while the header unlocks: two
	// slow steps that do not depend on each other (lvm runs while the
	// key derivation computes, on a machine with a CPU to spare).
	early := e.discoverEarly(ctx, o.Target)
	src, err := e.inspectLUKS(o.Target, o.Open)
	if err != nil {
		early.wait()
		return nil, err
	}
	m, dpath, di, H, hdr, keys, cs, align := src.m, src.dpath, src.di, src.H, src.hdr, src.keys, src.cs, src.align
	var newKey []byte
	fail := func(err error) (*EncryptPlan, error) {
		early.wait()
		keys.Wipe()
		for i := range newKey {
			newKey[i] = 0
		}
		return nil, err
	}
	rk, ok := hdr.(Rekeyable)
	if !ok {
		return fail(refuse(dpath, "", "online rekey needs a LUKS header dmconvert can stage a new key in"))
	}
	if len(o.AlsoPassphrases) > 0 {
		kk, ok := hdr.(KeyslotKeeper)
		if !ok {
			return fail(refuse(dpath, "", "this header keeps one passphrase through a rekey: give no --also-key-file"))
		}
		for i, p := range o.AlsoPassphrases {
			if _, err := kk.AddOpener(p); err != nil {
				if errors.Is(err, ErrWrongPassphrase) {
					return fail(fmt.Errorf("%s: further key #%d (--also-key-file) opens no keyslot of the header: %w", dpath, i+1, err))
				}
				return fail(refuse(dpath, "", "further key #%d (--also-key-file) cannot be kept: %v", i+1, err))
			}
		}
	}
	if others := rk.OtherKeyslots(); len(others) > 0 && !o.RemoveOtherKeyslots {
		return fail(refuse(dpath, "rerun with --remove-other-keyslots to drop them (their passphrases stop working), or remove them first with cryptsetup luksKillSlot",
			"%s not opened by the passphrase given and would lose their key%s", keyslotsAre(others), tokensNote(hdr, others)))
	}

	// What is on the mapping: an LVM PV (its VG is fenced during the
	// run), or anything else (a mounted file system): the mapping keeps
	// its name, size and contents, so nothing above it changes.
	node := e.Host.NodePath(m.name)
	pv, err := e.discovered(ctx, early, node)
	switch {
	case errors.Is(err, ErrNotPV):
		pv = nil
	case err != nil:
		return fail(err)
	case pv.VG == "":
		pv = nil
	case pv.Refusal != "":
		return fail(refuse(node, "", "volume group %s cannot be converted: %s", pv.VG, pv.Refusal))
	}

	// The new key's cipher and size: checked here, then by the kernel
	// (a crypt table with the new cipher loaded into a private device
	// that is never resumed), before anything is written.
	ncs, err := rekeyCrypt(cs, o.Cipher, o.KeySize)
	if err != nil {
		return fail(refuse(dpath, "", "cannot rekey: %v", err))
	}
	// LUKS1 encrypts every keyslot with the data's cipher and key size,
	// so a new one moves every keyslot to a new layout at the switch
	// (docs/design.md section 8, "LUKS1 to another cipher or key size"):
	// the data stays where it is (in place).
	luks1Respec := hdr.Version() == 1 && ncs != cs
	runID, err := newRunID()
	if err != nil {
		return fail(err)
	}
	if ncs != cs {
		if err := e.probeCrypt(runID, ncs, di.Dev, H, align); err != nil {
			var kr *kernelRefusal
			if errors.As(err, &kr) {
				return fail(refuse(dpath, "`cryptsetup benchmark --cipher SPEC --key-size BITS` tries a cipher", "cannot rekey: %v", err))
			}
			return fail(err)
		}
	}

	// The new key, staged in an unbound keyslot; then the gap: what the
	// keyslot areas leave free before the data.
	newKey = make([]byte, ncs.KeyBytes)
	if _, err := rand.Read(newKey); err != nil {
		return fail(err)
	}
	if err := rk.StageRekey(newKey, o.Passphrase, ncs.Cipher); err != nil {
		hint := "free a keyslot, or make room in the keyslots area"
		switch {
		case luks1Respec:
			hint = "rekey without --cipher/--key-size, remove keyslots that are not needed (cryptsetup luksKillSlot), or convert the header to LUKS2 first (cryptsetup convert --type luks2, offline)"
		case hdr.Version() == 1:
			hint = "remove a keyslot that is no longer needed (cryptsetup luksKillSlot): the new key waits in a free one until the rekey ends"
		}
		return fail(refuse(dpath, hint, "cannot add a keyslot for the new key: %v", err))
	}
	for i, p := range o.AlsoPassphrases {
		if err := hdr.(KeyslotKeeper).StageRekeyAlso(newKey, p, i, ncs.Cipher); err != nil {
			return fail(refuse(dpath, "free a keyslot, or make room in the keyslots area", "cannot add a keyslot for the new key opened by further key #%d: %v", i+1, err))
		}
	}
	if rk.KeyslotsEnd() > H {
		return fail(refuse(dpath, "remove a keyslot that is no longer needed (cryptsetup luksKillSlot), or rekey offline with cryptsetup reencrypt",
			"the keyslot material and the 4 KiB dmconvert keeps for its checkpoint records end at sector %d, after the data offset %d", rk.KeyslotsEnd(), H))
	}
	room := roundDown(H-rk.KeyslotsEnd(), align)
	gap := o.Chunk
	if gap == 0 {
		gap = DefaultRekeyGap
	}
	gap = roundDown(min(gap, room), max(align, labelSectors)) // both powers of two
	minGap := e.MinRekeyGap
	if minGap == 0 {
		minGap = DefaultMinRekeyGap
	}
	var plan *Plan
	if o.InPlace || room < minGap || gap == 0 || luks1Respec {
		// No room worth moving into (a LUKS1 header with cryptsetup's
		// default 512-bit key leaves 24 KiB): rewrite in place.
		chunk := o.Chunk
		if chunk == 0 {
			chunk = DefaultPlainChunk
		}
		plan, err = BuildRekeyInPlace(RekeyGeometry{DiskSize: di.Size, Header: H, Chunk: chunk, Align: align})
	} else {
		plan, err = BuildRekey(RekeyGeometry{DiskSize: di.Size, Header: H, Gap: gap, Chunk: gap, Align: align})
	}
	if err != nil {
		return fail(refuse(dpath, "", "%v", err))
	}
	jpath := o.Journal
	if jpath == "" {
		jpath = filepath.Join(DefaultJournalDir, hdr.UUID()+".journal")
	}
	if err := e.checkNewJournal(jpath, di.Dev, dpath); err != nil {
		return fail(err)
	}
	spec := &Spec{
		Version: PlanVersion, ID: runID, Op: "rekey", Disk: di, Name: m.name,
		Helpers: map[BackingID]string{
			OldID: helperNamePrefix + runID + "-old",
			NewID: helperNamePrefix + runID + "-new",
		},
		Crypt: ncs, OldCrypt: cs,
		LUKSVersion: hdr.Version(), LUKSUUID: hdr.UUID(),
		Forward: plan,
	}
	if kr, ok := hdr.(KeyslotRenumberer); ok {
		spec.KeyslotIDs = kr.KeyslotReplacements()
	}
	ep := &EncryptPlan{Spec: spec, Journal: jpath, JournalFS: e.Host.MemoryFS(jpath), Header: hdr,
		keys: map[BackingID][]byte{OldID: keys.Bound, NewID: newKey}}
	if pv != nil {
		spec.PVUUID, spec.VG, spec.VGDevices, spec.VGPVUUIDs, spec.VGSeqno, spec.PVDevice = pv.UUID, pv.VG, pv.VGDevices, pv.VGPVUUIDs, pv.VGSeqno, node
		ep.PV = pv
	}
	return ep, nil
}

// KeyslotRenumberer is a header whose rekey can give each new keyslot the
// number of the old keyslot it replaces (LUKS2).
type KeyslotRenumberer interface {
	// KeyslotReplacements maps each staged keyslot to the old one whose
	// number it takes; nil when numbers cannot be kept.
	KeyslotReplacements() map[int]int
}

// OtherKeyslotsNote describes what a rekey does to the keyslots it was not
// given a passphrase for (for plan printing).
func OtherKeyslotsNote(h HeaderFormat) string {
	rk, ok := h.(Rekeyable)
	if !ok {
		return ""
	}
	others := rk.OtherKeyslots()
	if len(others) == 0 {
		return ""
	}
	return keyslotsAre(others) + " removed (their passphrases were not given)" + tokensNote(h, others)
}

// keyslotsAre is "keyslot 3 is" or "keyslots 1, 3 are".
func keyslotsAre(ids []int) string {
	if len(ids) == 1 {
		return fmt.Sprintf("keyslot %d is", ids[0])
	}
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = fmt.Sprint(id)
	}
	return "keyslots " + strings.Join(s, ", ") + " are"
}

// TokenLister is a header that can name the tokens bound to a keyslot.
type TokenLister interface {
	TokensOf(keyslot int) []string
}

// tokensNote names the tokens bound to keyslots (a TPM2 or FIDO2
// enrollment, which stops working with its keyslot), for refusals and
// plans: "" when there are none.
func tokensNote(h HeaderFormat, keyslots []int) string {
	tl, ok := h.(TokenLister)
	if !ok {
		return ""
	}
	var s []string
	for _, id := range keyslots {
		if ts := tl.TokensOf(id); len(ts) > 0 {
			s = append(s, fmt.Sprintf("keyslot %d is bound to %s", id, strings.Join(ts, ", ")))
		}
	}
	if len(s) == 0 {
		return ""
	}
	return "; " + strings.Join(s, "; ") + ": enroll it again afterwards (systemd-cryptenroll)"
}

// KeptKeyslotsNote lists the keyslots whose passphrases keep working
// after a LUKS rekey (for plan printing): those the passphrases given
// opened; the new key gets a keyslot for each.
func KeptKeyslotsNote(h HeaderFormat) string {
	l, ok := h.(*LUKSHeader)
	if !ok || l.opened < 0 {
		return ""
	}
	s := []string{fmt.Sprintf("%d (the passphrase)", l.opened)}
	for i, id := range l.also {
		s = append(s, fmt.Sprintf("%d (--also-key-file #%d)", id, i+1))
	}
	what := "the passphrases of keyslots " + strings.Join(s, ", ") + " keep"
	if len(s) == 1 {
		what = "the passphrase of keyslot " + s[0] + " keeps"
	}
	if l.h.Version() == 1 {
		return what + " working, each with a new keyslot for the new key"
	}
	return what + " working, in the same keyslot number with its priority and tokens, rewrapped for the new key"
}

// earlyDiscovery is a discoverInPlace started before the header is
// unlocked.
type earlyDiscovery struct {
	node string
	done chan struct{}
	pv   *PV
	err  error
}

// discoverEarly starts discoverInPlace of target's mapping in the
// background (nil when target is not a mapping found by name: the
// discovery then runs after the unlock, as before).
func (e *Engine) discoverEarly(ctx context.Context, target string) *earlyDiscovery {
	m, err := e.findMapping(target)
	if err != nil {
		return nil
	}
	d := &earlyDiscovery{node: e.Host.NodePath(m.name), done: make(chan struct{})}
	go func() {
		defer close(d.done)
		d.pv, d.err = e.discoverInPlace(ctx, d.node)
	}()
	return d
}

// wait lets a started discovery end (no goroutine outlives the plan).
func (d *earlyDiscovery) wait() {
	if d != nil {
		<-d.done
	}
}

// discovered is the discovery of node: d's when d was of node, else a
// new one.
func (e *Engine) discovered(ctx context.Context, d *earlyDiscovery, node string) (*PV, error) {
	if d != nil {
		d.wait()
		if d.node == node {
			return d.pv, d.err
		}
	}
	return e.discoverInPlace(ctx, node)
}
