package convert

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"

	"github.com/dmconvert/dmconvert/luks"
)

// LUKSHeader adapts a luks.Header to the engine's HeaderFormat. While a
// run is in progress the header carries dmconvert's marks: the mandatory
// requirement "dmconvert" (LUKS2) or the disguised magic (LUKS1), so that
// stock cryptsetup refuses the half-converted disk.
type LUKSHeader struct {
	h *luks.Header
	// unbound is the keyslot holding a rekey's new key (-1: none).
	unbound int
	// opened is the bound keyslot the passphrase opened (-1: unknown).
	opened int
	// also are the bound keyslots further passphrases opened (AddOpener),
	// in the order given; each gets its own keyslot for the new key.
	also []int
	// replaces maps each keyslot staged for the new key to the old
	// keyslot its passphrase opened (StageRekey, StageRekeyAlso).
	replaces map[int]int
}

// NewLUKSHeader wraps h and marks it in progress.
func NewLUKSHeader(h *luks.Header) (*LUKSHeader, error) {
	if h.Version() == 1 {
		if err := h.SetDisguised(true); err != nil {
			return nil, err
		}
	} else if err := h.SetRequirement(luks.RequirementDmconvert); err != nil {
		return nil, err
	}
	return &LUKSHeader{h: h, unbound: -1, opened: -1}, nil
}

// OpenLUKSImage reads a header image (from a journal or the disk) and
// unlocks it with key (a passphrase or key file contents). It returns the
// header, marked in progress, and the volume keys: the one of the data
// segment (Bound) and, if the header has an unbound keyslot this key
// opens, that one (Unbound). The caller wipes them.
func OpenLUKSImage(img []byte, key []byte) (*LUKSHeader, Keys, error) {
	h, err := luks.Read(bytes.NewReader(img))
	if err != nil {
		return nil, Keys{}, fmt.Errorf("reading the header image: %w", err)
	}
	vk, opened, err := h.Unlock(key)
	if err != nil {
		if errors.Is(err, luks.ErrWrongPassphrase) {
			return nil, Keys{}, fmt.Errorf("%w", ErrWrongPassphrase)
		}
		return nil, Keys{}, err
	}
	defer vk.Wipe()
	var ks Keys
	// vk.Bytes is the key's own buffer, which the deferred Wipe zeroes:
	// hand out copies.
	ks.Bound = append([]byte(nil), vk.Bytes()...)
	unbound := -1
	// LUKS2: an unbound keyslot; LUKS1: the key a rekey staged.
	if uk, slot, err := h.UnlockUnbound(key); err == nil {
		ks.Unbound = append([]byte(nil), uk.Bytes()...)
		uk.Wipe()
		unbound = slot
	}
	lh, err := NewLUKSHeader(h)
	if err != nil {
		ks.Wipe()
		return nil, Keys{}, err
	}
	lh.unbound, lh.opened = unbound, opened
	return lh, ks, nil
}

// Keys are the volume keys a header gives: the data segment's and an
// unbound keyslot's (rekey keeps the new key there during a run).
type Keys struct {
	Bound, Unbound []byte
}

// Wipe zeroes both keys.
func (k Keys) Wipe() {
	for _, b := range [][]byte{k.Bound, k.Unbound} {
		for i := range b {
			b[i] = 0
		}
	}
}

// Header is the wrapped luks header.
func (l *LUKSHeader) Header() *luks.Header { return l.h }

// Sectors implements HeaderFormat.
func (l *LUKSHeader) Sectors() Sectors { return Sectors(l.h.DataOffset() / 512) }

// UUID implements HeaderFormat.
func (l *LUKSHeader) UUID() string { return l.h.UUID() }

// Version implements HeaderFormat.
func (l *LUKSHeader) Version() int { return l.h.Version() }

// Crypt implements HeaderFormat: the table cryptsetup would load.
// cryptsetup 2.6 activates a LUKS2 header with 4096-byte sectors as
// "... 1 sector_size:4096" without iv_large_sectors (IVs still count
// 512-byte sectors; seen in the test VM, luks TestGuestActivation).
func (l *LUKSHeader) Crypt() CryptSpec {
	return CryptSpec{
		Cipher:     l.h.Cipher(),
		KeyBytes:   l.h.VolumeKeySize(),
		SectorSize: uint32(l.h.SectorSize()),
	}
}

func (l *LUKSHeader) setCheckpoint(cp Checkpoint) error {
	b, err := marshalCheckpoint(cp)
	if err != nil {
		return err
	}
	return l.h.SetCheckpoint(b)
}

// Image implements HeaderFormat.
func (l *LUKSHeader) Image(cp Checkpoint) ([]byte, error) {
	if err := l.setCheckpoint(cp); err != nil {
		return nil, err
	}
	l.h.BumpSeqID()
	return l.h.Image()
}

// CheckpointWrites implements HeaderFormat. LUKS2: both metadata copies
// with a new sequence id, primary first, a flush between them so a torn
// write always leaves one valid copy. LUKS1: one record, in the slot that
// does not hold the newest one.
func (l *LUKSHeader) CheckpointWrites(cp Checkpoint) ([]Write, error) {
	if err := l.setCheckpoint(cp); err != nil {
		return nil, err
	}
	return l.metadataWrites()
}

func (l *LUKSHeader) metadataWrites() ([]Write, error) {
	if l.h.Version() == 1 {
		// Only the slot of the new record: the other one keeps the
		// previous record, valid if this write tears.
		off, rec, err := l.h.CheckpointRecord()
		if err != nil {
			return nil, err
		}
		return []Write{{Off: off, Data: rec, Flush: true}}, nil
	}
	l.h.BumpSeqID()
	m, err := l.h.MetadataImage()
	if err != nil {
		return nil, err
	}
	half := len(m) / 2
	return []Write{{Off: 0, Data: m[:half], Flush: true}, {Off: int64(half), Data: m[half:], Flush: true}}, nil
}

// MarkWrites implements HeaderFormat. The header already carries the
// marks in memory (NewLUKSHeader, StageRekey); this writes them: the
// staged key's keyslot material (a rekey), then LUKS2's metadata (both
// copies, a flush between), or LUKS1's record then its disguised first
// block (which carries the staged-key record).
func (l *LUKSHeader) MarkWrites(cp Checkpoint) ([]Write, error) {
	var ws []Write
	if l.unbound >= 0 {
		// The new key's keyslot material goes first, into an area the
		// metadata on disk does not reference yet. Written from the
		// image, so a resume that redoes the mark writes it too.
		img, err := l.h.Image()
		if err != nil {
			return nil, err
		}
		staged := l.stagedSlots()
		for _, ks := range l.h.Keyslots() {
			if slices.Contains(staged, ks.ID) {
				ws = append(ws, Write{Off: ks.AreaOffset, Data: img[ks.AreaOffset : ks.AreaOffset+ks.AreaSize], Flush: true})
			}
		}
	}
	cw, err := l.CheckpointWrites(cp)
	if err != nil {
		return nil, err
	}
	ws = append(ws, cw...)
	if l.h.Version() == 1 {
		first, err := l.h.FirstBlock()
		if err != nil {
			return nil, err
		}
		ws = append(ws, Write{Off: 0, Data: first, Flush: true})
	}
	return ws, nil
}

// StageRekey implements Rekeyable: an unbound keyslot holding newKey,
// opened by pass with the key derivation (type and cost) of the keyslot
// pass opened, its area encrypted as cryptsetup would encrypt a keyslot
// of a segment with cipher and newKey's size (luks.KeyslotEncryption);
// MarkWrites then writes its material with the marks. LUKS1 has no
// unbound keyslots: the key is staged in a free keyslot of the disguised
// header instead (luks package, rekey1.go), with the header's cipher and
// key size, which cipher and newKey must match.
func (l *LUKSHeader) StageRekey(newKey, pass []byte, cipher string) error {
	if l.unbound >= 0 {
		return fmt.Errorf("the header already holds a staged key in keyslot %d", l.unbound)
	}
	var p luks.PBKDF
	found := false
	for _, ks := range l.h.Keyslots() {
		if ks.ID == l.opened {
			p, found = ks.PBKDF, true
		}
	}
	if !found {
		return fmt.Errorf("internal error: the keyslot the passphrase opened is unknown")
	}
	vk := luks.NewVolumeKeyFromBytes(newKey)
	defer vk.Wipe()
	slot, err := l.h.AddUnboundKeyslotFor(vk, pass, p, cipher)
	if err != nil {
		return err
	}
	l.unbound = slot
	l.replace(slot, l.opened)
	return nil
}

func (l *LUKSHeader) replace(staged, old int) {
	if l.replaces == nil {
		l.replaces = map[int]int{}
	}
	l.replaces[staged] = old
}

// KeyslotReplacements implements KeyslotRenumberer: LUKS2 only (a LUKS1
// keyslot's number is its place on the disk).
func (l *LUKSHeader) KeyslotReplacements() map[int]int {
	if l.h.Version() == 1 || len(l.replaces) == 0 {
		return nil
	}
	return maps.Clone(l.replaces)
}

// stagedSlots are the keyslots holding the new key: the unbound keyslot
// and every other one of its digest (LUKS2: one per passphrase kept), or
// LUKS1's staged keyslot.
func (l *LUKSHeader) stagedSlots() []int {
	if l.unbound < 0 {
		return nil
	}
	if l.h.Version() == 1 {
		return l.h.StagedKeyslots()
	}
	out := []int{l.unbound}
	d := -1
	for _, ks := range l.h.Keyslots() {
		if ks.ID == l.unbound {
			d = ks.Digest
		}
	}
	for _, ks := range l.h.Keyslots() {
		if ks.ID != l.unbound && !ks.Bound && d >= 0 && ks.Digest == d {
			out = append(out, ks.ID)
		}
	}
	slices.Sort(out)
	return out
}

// AddOpener implements KeyslotKeeper: pass, another passphrase or key
// file of the volume, must open a bound keyslot that neither the main
// passphrase nor an earlier one opened. Call it before StageRekey, which
// then gives the new key a keyslot opened by pass too (StageRekeyAlso).
func (l *LUKSHeader) AddOpener(pass []byte) (int, error) {
	if l.unbound >= 0 {
		return -1, fmt.Errorf("internal error: passphrases are added before the new key is staged")
	}
	vk, slot, err := l.h.Unlock(pass)
	if err != nil {
		if errors.Is(err, luks.ErrWrongPassphrase) {
			return -1, fmt.Errorf("%w", ErrWrongPassphrase)
		}
		return -1, err
	}
	vk.Wipe()
	if slot == l.opened || slices.Contains(l.also, slot) {
		return -1, fmt.Errorf("it opens keyslot %d, which a passphrase given before opens too", slot)
	}
	l.also = append(l.also, slot)
	return slot, nil
}

// StageRekeyAlso implements KeyslotKeeper: after StageRekey, a keyslot
// for newKey opened by the i-th passphrase given to AddOpener, with the
// key derivation of the keyslot it opened, in the staged key's digest.
func (l *LUKSHeader) StageRekeyAlso(newKey, pass []byte, i int, cipher string) error {
	if l.unbound < 0 || i < 0 || i >= len(l.also) {
		return fmt.Errorf("internal error: no staged key, or no passphrase %d", i)
	}
	var p luks.PBKDF
	for _, ks := range l.h.Keyslots() {
		if ks.ID == l.also[i] {
			p = ks.PBKDF
		}
	}
	vk := luks.NewVolumeKeyFromBytes(newKey)
	defer vk.Wipe()
	slot, err := l.h.AddUnboundKeyslotFor(vk, pass, p, cipher)
	if err != nil {
		return err
	}
	if !slices.Contains(l.stagedSlots(), slot) {
		return fmt.Errorf("internal error: keyslot %d is not in the staged key's digest", slot)
	}
	l.replace(slot, l.also[i])
	return nil
}

// KeyslotsEnd implements Rekeyable. For LUKS1 it includes the 4 KiB
// after the keyslot material (4 KiB aligned) where the checkpoint records
// live while a key is staged: the data must not move over them, and the
// final header keeps them room for a later run, in the last 4 KiB before
// its data.
func (l *LUKSHeader) KeyslotsEnd() Sectors {
	end := l.h.KeyslotAreasEnd()
	if l.h.Version() == 1 {
		end = (end+4095)/4096*4096 + 4096
	}
	return Sectors((end + 511) / 512)
}

// OtherKeyslots implements Rekeyable: the keyslots other than the one the
// passphrase opened and the staged one.
func (l *LUKSHeader) OtherKeyslots() []int {
	var out []int
	for _, ks := range l.h.Keyslots() {
		if ks.ID != l.opened && !slices.Contains(l.also, ks.ID) && !slices.Contains(l.stagedSlots(), ks.ID) {
			out = append(out, ks.ID)
		}
	}
	return out
}

// TokensOf implements TokenLister: the LUKS2 tokens bound to keyslot id,
// as "token N (type)" (a TPM2 or FIDO2 enrollment stops working with its
// keyslot). The run's own checkpoint token is not listed.
func (l *LUKSHeader) TokensOf(id int) []string {
	var out []string
	for _, tid := range l.h.TokenIDs() {
		raw, ok := l.h.Token(tid)
		if !ok {
			continue
		}
		var tok struct {
			Type     string   `json:"type"`
			Keyslots []string `json:"keyslots"`
		}
		if json.Unmarshal(raw, &tok) != nil || tok.Type == luks.TokenTypeDmconvert {
			continue
		}
		if slices.Contains(tok.Keyslots, strconv.Itoa(id)) {
			out = append(out, fmt.Sprintf("token %d (%s)", tid, tok.Type))
		}
	}
	return out
}

// recorder collects the writes of a luks Commit as engine Writes.
type recorder struct{ ws []Write }

func (r *recorder) WriteAt(p []byte, off int64) (int, error) {
	r.ws = append(r.ws, Write{Off: off, Data: append([]byte(nil), p...)})
	return len(p), nil
}

// Sync marks a flush after the last write.
func (r *recorder) Sync() error {
	if n := len(r.ws); n > 0 {
		r.ws[n-1].Flush = true
	}
	return nil
}

// applyRekeyEnd changes the in-memory header to a rekey's end: the data
// segment on the staged key (f.Cipher, at f.DataOffset) and every other
// keyslot removed (f.Rekey), or the staged keyslot removed (an abort).
func (l *LUKSHeader) applyRekeyEnd(f Final) error {
	if !f.Rekey {
		for _, id := range l.stagedSlots() {
			if err := l.h.RemoveKeyslot(id); err != nil {
				return err
			}
		}
		return nil
	}
	staged := l.stagedSlots()
	if err := l.h.BindSegmentCipher(l.unbound, f.Cipher); err != nil {
		return err
	}
	// Each new keyslot takes the number (and priority) of the old one
	// its passphrase opened, so that tokens and key-slot= options that
	// name it keep working; the other old keyslots go.
	keep := map[int]bool{}
	for _, id := range staged {
		keep[id] = true
	}
	exists := map[int]bool{}
	for _, ks := range l.h.Keyslots() {
		exists[ks.ID] = true
	}
	for _, st := range slices.Sorted(maps.Keys(f.Keyslots)) {
		old := f.Keyslots[st]
		if !keep[st] || keep[old] || !exists[old] {
			continue // not this header's (cannot happen): leave the numbers
		}
		if err := l.h.ReplaceKeyslot(old, st); err != nil {
			return err
		}
		delete(keep, st)
		keep[old] = true
	}
	for _, ks := range l.h.Keyslots() {
		if !keep[ks.ID] {
			if err := l.h.RemoveKeyslot(ks.ID); err != nil {
				return err
			}
		}
	}
	if off := int64(f.DataOffset) * 512; off != l.h.DataOffset() {
		return l.h.SetDataOffset(off)
	}
	// In place: the data stayed where it was, and so does the keyslots
	// area's size.
	return nil
}

// FinalWrites implements HeaderFormat: the requirement and the token go
// (LUKS2), or the checkpoint records are zeroed and the real magic written
// last (LUKS1). For a rekey the data segment switches to the new key and
// offset (and to f.Cipher, when given) and the old key's keyslots are
// removed (their material wiped after the metadata no longer names them).
func (l *LUKSHeader) FinalWrites(f Final) ([]Write, error) {
	if l.h.Version() == 1 && (f.Rekey || f.DropUnbound) {
		return l.finalRekeyWrites1(f)
	}
	if f.Rekey || f.DropUnbound {
		if l.unbound < 0 {
			return nil, fmt.Errorf("internal error: the header has no unbound keyslot for the new key")
		}
		l.h.RemoveCheckpoint()
		if err := l.h.ClearRequirement(luks.RequirementDmconvert); err != nil {
			return nil, err
		}
		if err := l.applyRekeyEnd(f); err != nil {
			return nil, err
		}
		rec := &recorder{}
		if err := l.h.Commit(rec); err != nil {
			return nil, err
		}
		return rec.ws, nil
	}
	l.h.RemoveCheckpoint()
	if l.h.Version() == 1 {
		area, err := l.h.CheckpointArea()
		if err != nil {
			return nil, err
		}
		if err := l.h.SetDisguised(false); err != nil {
			return nil, err
		}
		first, err := l.h.FirstBlock()
		if err != nil {
			return nil, err
		}
		return []Write{
			{Off: area, Data: make([]byte, 2*luks.CheckpointRecordSize), Flush: true},
			{Off: 0, Data: first, Flush: true},
		}, nil
	}
	if err := l.h.ClearRequirement(luks.RequirementDmconvert); err != nil {
		return nil, err
	}
	return l.metadataWrites()
}

// ReadCheckpoint implements HeaderFormat. It reads the header on disk and
// takes the checkpoint from it; it also adopts a higher LUKS2 sequence
// id from the disk so later metadata writes supersede what is there.
func (l *LUKSHeader) ReadCheckpoint(r io.ReaderAt) (Checkpoint, bool, error) {
	var payload []byte
	if l.h.Version() == 1 {
		p, err := l.h.LoadCheckpoint(r)
		if err != nil {
			if errors.Is(err, luks.ErrNoCheckpoint) {
				return Checkpoint{}, false, nil
			}
			return Checkpoint{}, false, err
		}
		payload = p
	} else {
		dh, err := luks.Read(r)
		if err != nil {
			// Torn or missing: the caller rewrites the header.
			return Checkpoint{}, false, nil
		}
		for l.h.SeqID() <= dh.SeqID() {
			l.h.BumpSeqID()
		}
		p, err := dh.Checkpoint()
		if err != nil {
			return Checkpoint{}, false, nil
		}
		payload = p
	}
	cp, err := unmarshalCheckpoint(payload)
	if err != nil {
		return Checkpoint{}, false, nil
	}
	return cp, true, nil
}

// finalRekeyWrites1 ends a LUKS1 rekey (or its abort). The header on disk
// is disguised throughout (stock cryptsetup does not recognise it), so
// the order only has to make the last write the one that reveals it:
//
//  1. the phdr (sectors 0-1), still disguised, in its final form: the new
//     key's digest and keyslot and the new data offset (rekey), or the
//     old key's without the staged keyslot (abort); flush;
//  2. the material of the keyslots that go (the old key's, or the staged
//     key's) overwritten with random bytes; flush;
//  3. the checkpoint records zeroed; flush;
//  4. sector 0 again with the real magic; flush.
//
// A crash before 4 leaves a disguised header that only dmconvert resume
// (which redoes all four from the journal's image) touches; sector 0 is
// one sector, so after 4 the whole final phdr is there. The records are
// found where the staged header keeps them, before it is dropped.
func (l *LUKSHeader) finalRekeyWrites1(f Final) ([]Write, error) {
	if l.unbound < 0 || !slices.Contains(l.h.StagedKeyslots(), l.unbound) {
		return nil, fmt.Errorf("internal error: the LUKS1 header holds no staged key")
	}
	area, err := l.h.CheckpointArea()
	if err != nil {
		return nil, err
	}
	l.h.RemoveCheckpoint()
	if err := l.applyRekeyEnd(f); err != nil {
		return nil, err
	}
	l.unbound = -1
	// Commit writes the phdr (disguised: the in-memory header still is),
	// then the wipes of removed keyslots, a flush after each.
	rec := &recorder{}
	if err := l.h.Commit(rec); err != nil {
		return nil, err
	}
	ws := append(rec.ws, Write{Off: area, Data: make([]byte, 2*luks.CheckpointRecordSize), Flush: true})
	if err := l.h.SetDisguised(false); err != nil {
		return nil, err
	}
	first, err := l.h.FirstBlock()
	if err != nil {
		return nil, err
	}
	return append(ws, Write{Off: 0, Data: first[:512], Flush: true}), nil
}
