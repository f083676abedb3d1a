package convert

import (
	"bytes"
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/luks"
)

// Online rekey of a plain dm-crypt mapping (docs/design.md section 9).
//
// A plain mapping has no header: no spare sectors for a moving gap, no
// place for the new key, no mark that tells boot-time tools a run is under
// way. So the data is re-encrypted where it is, one chunk at a time, with
// the mapping suspended while its chunk is rewritten and the chunk's old
// ciphertext saved in the journal first; the new key goes to a key file
// the user names (cryptsetup's plain mode reads a key file as the key
// itself), and the journal keeps only salted digests of both keys.

// plainMagic starts the journal's "header image" of a plain rekey.
const plainMagic = "dmconvert-plain-rekey-v1\n"

// plainDigestIter is the PBKDF2 iteration count of the key digests: the
// old key may come from a passphrase (plain mode's hashing). A variable
// only so that the fake-kernel tests, which plan and resume thousands of
// plain runs, can make it cheap (plain_test.go); nothing else sets it.
var plainDigestIter = 20000

// plainRecord is what the journal keeps of a plain rekey's keys.
type plainRecord struct {
	NewKeyFile string `json:"new_key_file,omitempty"`
	// HeaderFile is the detached LUKS2 header that holds the new key
	// (plain to LUKS2), opened by the user's passphrase.
	HeaderFile string `json:"header_file,omitempty"`
	// OnDisk: the LUKS2 header goes on the disk, into the sectors before
	// the data that the plain mapping leaves unused, at the end of the
	// run. Until then the journal keeps it (Header, up to its last
	// non-zero byte, of HeaderSize bytes): marked in progress, its
	// keyslot wrapped by the passphrase.
	OnDisk     bool      `json:"on_disk,omitempty"`
	Header     []byte    `json:"header,omitempty"`
	HeaderSize int64     `json:"header_size,omitempty"`
	Salt       []byte    `json:"salt"`
	OldDigest  []byte    `json:"old_digest"`
	NewDigest  []byte    `json:"new_digest"`
	OldCrypt   CryptSpec `json:"old_crypt"`
	Crypt      CryptSpec `json:"crypt"`
	// TCrypt: the source is a TrueCrypt/VeraCrypt volume (its data moves
	// to the start of the disk).
	TCrypt *tcryptRecord `json:"tcrypt,omitempty"`
}

func plainDigest(salt, key []byte, what string) []byte {
	d, err := pbkdf2.Key(sha256.New, string(key), append([]byte(what), salt...), plainDigestIter, 32)
	if err != nil {
		panic(err) // only for parameters out of range
	}
	return d
}

func (p *plainRecord) check(key, digest []byte, what string) bool {
	return subtle.ConstantTimeCompare(plainDigest(p.Salt, key, what), digest) == 1
}

// plainHeader is the HeaderFormat of a plain rekey: there is no header on
// the disk; the image is the journal's record.
type plainHeader struct {
	rec plainRecord
	// lh is the detached LUKS2 header (plain to LUKS2), marked in
	// progress until the run ends.
	lh *LUKSHeader
}

func (h *plainHeader) Sectors() Sectors { return 0 }
func (h *plainHeader) Image(Checkpoint) ([]byte, error) {
	b, err := json.Marshal(h.rec)
	if err != nil {
		return nil, err
	}
	return append([]byte(plainMagic), b...), nil
}
func (h *plainHeader) CheckpointWrites(Checkpoint) ([]Write, error) { return nil, nil }

// FinalWrites ends the files of a plain run (there is nothing on the
// disk to write): a finished run's detached header loses its in-progress
// mark, written here (the engine's writes go to the disk); a redo after a
// crash writes it again. An aborted run leaves its new key file or header
// as it is: a resume of the abort may still need the key (the command
// says the file can go).
func (h *plainHeader) FinalWrites(f Final) ([]Write, error) {
	var ws []Write
	if h.rec.TCrypt != nil {
		ws = h.rec.TCrypt.finalWrites(f.Rekey)
	}
	if f.Rekey && h.lh != nil && h.rec.OnDisk {
		return h.onDiskFinal()
	}
	if f.Rekey && h.lh != nil {
		ws, err := h.lh.FinalWrites(Final{})
		if err != nil {
			return nil, err
		}
		if err := writeFileAt(h.rec.HeaderFile, ws); err != nil {
			return nil, fmt.Errorf("writing the final header to %s: %w", h.rec.HeaderFile, err)
		}
	}
	return ws, nil
}

// onDiskFinal is the end of a plain volume turned into LUKS2 with its
// header on the disk: the final header (the mark cleared), written over
// the sectors before the data: its keyslots area first, then, once that
// is on the disk, its metadata, which is what makes cryptsetup see it. A
// crash in between leaves no header cryptsetup reads; a redo writes it all
// again.
func (h *plainHeader) onDiskFinal() ([]Write, error) {
	img, err := h.lh.Image(Checkpoint{})
	if err != nil {
		return nil, err
	}
	fw, err := h.lh.FinalWrites(Final{})
	if err != nil {
		return nil, err
	}
	for _, w := range fw {
		if w.Off < 0 || w.Off+int64(len(w.Data)) > int64(len(img)) {
			return nil, fmt.Errorf("internal error: a final header write at %d+%d outside the %d-byte header", w.Off, len(w.Data), len(img))
		}
		copy(img[w.Off:], w.Data)
	}
	m, err := h.lh.h.MetadataImage()
	if err != nil {
		return nil, err
	}
	return []Write{{Off: int64(len(m)), Data: img[len(m):], Flush: true}, {Off: 0, Data: img[:len(m)], Flush: true}}, nil
}

// writeFileAt applies ws to the file at path, syncing where a write asks
// for it and at the end.
func writeFileAt(path string, ws []Write) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, w := range ws {
		if _, err := f.WriteAt(w.Data, w.Off); err != nil {
			return err
		}
		if w.Flush {
			if err := f.Sync(); err != nil {
				return err
			}
		}
	}
	return f.Sync()
}

func (h *plainHeader) MarkWrites(Checkpoint) ([]Write, error) { return nil, nil }
func (h *plainHeader) ReadCheckpoint(io.ReaderAt) (Checkpoint, bool, error) {
	return Checkpoint{}, false, nil
}
func (h *plainHeader) UUID() string {
	if h.lh != nil {
		return h.lh.UUID()
	}
	return ""
}
func (h *plainHeader) Version() int     { return 0 }
func (h *plainHeader) Crypt() CryptSpec { return h.rec.OldCrypt }

// IsPlainImage reports whether a journal's header image is a plain
// rekey's record.
func IsPlainImage(img []byte) bool { return bytes.HasPrefix(img, []byte(plainMagic)) }

// OpenPlainImage recovers both keys of a plain rekey from its journal
// record: the new one from the key file it names (or, plain to LUKS2,
// from the detached header it names, opened by pass), the old one from
// oldKey (cryptsetup's plain key file semantics: its first key-size
// bytes). Both are checked against the record's digests.
func OpenPlainImage(img, oldKey, pass []byte) (HeaderFormat, Keys, error) {
	if !IsPlainImage(img) {
		return nil, Keys{}, errors.New("not a plain rekey record")
	}
	var rec plainRecord
	if err := json.Unmarshal(img[len(plainMagic):], &rec); err != nil {
		return nil, Keys{}, fmt.Errorf("reading the plain rekey record: %w", err)
	}
	h := &plainHeader{rec: rec}
	var newKey []byte
	if rec.OnDisk {
		if rec.HeaderSize < int64(len(rec.Header)) || rec.HeaderSize > 1<<30 {
			return nil, Keys{}, errors.New("the plain rekey record's LUKS2 header is corrupt")
		}
		b := make([]byte, rec.HeaderSize)
		copy(b, rec.Header)
		lh, ks, err := OpenLUKSImage(b, pass)
		if err != nil {
			return nil, Keys{}, fmt.Errorf("opening the new LUKS2 header kept in the journal: %w", err)
		}
		h.lh, newKey = lh, ks.Bound
		clear(ks.Unbound)
	} else if rec.HeaderFile != "" {
		b, err := os.ReadFile(rec.HeaderFile)
		if err != nil {
			return nil, Keys{}, fmt.Errorf("reading the new header: %w", err)
		}
		lh, ks, err := OpenLUKSImage(b, pass)
		if err != nil {
			return nil, Keys{}, fmt.Errorf("opening the new header %s: %w", rec.HeaderFile, err)
		}
		h.lh, newKey = lh, ks.Bound
		clear(ks.Unbound)
	} else {
		k, err := readKeyFile(rec.NewKeyFile, rec.Crypt.KeyBytes)
		if err != nil {
			return nil, Keys{}, err
		}
		newKey = k
	}
	if len(newKey) != rec.Crypt.KeyBytes || !rec.check(newKey, rec.NewDigest, "new") {
		clear(newKey)
		where := rec.NewKeyFile
		if rec.HeaderFile != "" {
			where = "header " + rec.HeaderFile
		} else if rec.OnDisk {
			where = "the journal's LUKS2 header"
		}
		return nil, Keys{}, fmt.Errorf("%s does not hold the new key of this run (it was changed or replaced)", where)
	}
	if oldKey == nil && rec.TCrypt != nil {
		k, err := rec.TCrypt.oldKey(pass)
		if err != nil {
			clear(newKey)
			return nil, Keys{}, err
		}
		defer clear(k)
		oldKey = k
	}
	if len(oldKey) < rec.OldCrypt.KeyBytes || !rec.check(oldKey[:rec.OldCrypt.KeyBytes], rec.OldDigest, "old") {
		clear(newKey)
		return nil, Keys{}, fmt.Errorf("%w: it is not the old %d-bit key of this plain mapping (give the old key file with --old-key-file)", ErrWrongPassphrase, rec.OldCrypt.KeyBytes*8)
	}
	return h, Keys{Bound: append([]byte(nil), oldKey[:rec.OldCrypt.KeyBytes]...), Unbound: newKey}, nil
}

func readKeyFile(path string, n int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading the new key: %w", err)
	}
	defer f.Close()
	k := make([]byte, n)
	if _, err := io.ReadFull(f, k); err != nil {
		return nil, fmt.Errorf("reading the new key from %s: %w", path, err)
	}
	return k, nil
}

// writeNewFile creates path (it must not exist) holding data, mode 0600,
// durably (the file and its directory entry).
func writeNewFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("creating %s: %w", path, err)
	}
	_, werr := f.Write(data)
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(path)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// tableKeys returns the keys of a plain run's cipher that live tables
// show: the old key's helper (a dmconvert process died), or the mapping
// itself (opened again after a reboot, or already on the new key). The
// caller checks them against the journal's digests and wipes them.
func (e *Engine) tableKeys(spec *Spec) [][]byte {
	var out [][]byte
	for _, name := range []string{spec.Helpers[OldID], spec.Name} {
		t, err := e.DM.Table(name)
		if err != nil || len(t) != 1 {
			continue
		}
		c, ok := t[0].Params.(*dmtable.Crypt)
		if !ok || string(c.Cipher) != spec.OldCrypt.Cipher || c.Key.IsKeyring() {
			continue
		}
		if k := c.Key.Bytes(); len(k) == spec.OldCrypt.KeyBytes {
			out = append(out, k)
		}
	}
	return out
}

// PlainRekeyOptions are the inputs of PlanPlainRekey.
type PlainRekeyOptions struct {
	// Target is the open plain mapping (its name or /dev/mapper path)
	// or the device under it.
	Target string
	// NewKeyFile receives the new key (created by the run; it must not
	// exist).
	NewKeyFile string
	// Journal path; default DefaultJournalDir/plain-<name>.journal.
	Journal string
	// Chunk is the most rewritten per step (sectors); 0 means 1 MiB.
	Chunk Sectors
	// Cipher and KeySize (bits) of the new key; empty/0 keep the
	// source's.
	Cipher  string
	KeySize int
	// Type "luks2" turns the volume into LUKS2: HeaderFile (created by
	// the run; it must not exist) holds the new key in a keyslot opened
	// by Passphrase (PBKDF: its KDF), instead of NewKeyFile. Without
	// HeaderFile the header goes on the disk, in the sectors before the
	// data (the mapping's offset), which must have room for it.
	Type       string
	HeaderFile string
	Passphrase []byte
	PBKDF      luks.PBKDF
	// HeaderSize is the detached header's size in bytes (0: 16 MiB).
	HeaderSize int64
	// PIM is a VeraCrypt volume's PIM (0: none); TCryptKeyfiles the
	// paths of its TrueCrypt keyfiles.
	PIM            int
	TCryptKeyfiles []string
	// OldKey gives the old key (keyBytes long) when the mapping's table
	// does not show it (a key in the kernel keyring): from a key file, or
	// from a passphrase with plain mode's hashing. It is checked against
	// the live mapping before anything is written.
	OldKey func(keyBytes int) ([]byte, error)
}

// DefaultPlainChunk is the default chunk of an in-place rewrite: the
// mapping is suspended while one chunk is saved and rewritten.
const DefaultPlainChunk Sectors = 1 << 20 / 512

// IsPlainMapping reports whether target is an open plain dm-crypt
// mapping (cryptsetup's CRYPT-PLAIN- UUID), without refusing anything.
func (e *Engine) IsPlainMapping(target string) bool {
	m, err := e.findMapping(target)
	return err == nil && strings.HasPrefix(m.info.UUID, "CRYPT-PLAIN-")
}

// PlanPlainRekey inspects an open plain dm-crypt mapping (a file system
// on it, or an LVM PV with live LVs) and returns a verified plan that
// re-encrypts it in place with a new random key. It writes nothing.
func (e *Engine) PlanPlainRekey(ctx context.Context, o PlainRekeyOptions) (*EncryptPlan, error) {
	m, err := e.findMapping(o.Target)
	if err != nil {
		return nil, err
	}
	tc := strings.HasPrefix(m.info.UUID, tcryptUUIDPrefix)
	if !strings.HasPrefix(m.info.UUID, "CRYPT-PLAIN-") && !tc {
		return nil, refuse(m.name, "", "not a plain dm-crypt mapping opened by cryptsetup (its uuid is %q)", m.info.UUID)
	}
	kind := "a plain mapping"
	if (o.PIM != 0 || len(o.TCryptKeyfiles) > 0) && !tc {
		return nil, refuse(m.name, "", "a PIM and TrueCrypt keyfiles are for a TrueCrypt/VeraCrypt volume opened with cryptsetup --type tcrypt")
	}
	if tc {
		kind = "a TrueCrypt/VeraCrypt volume"
		switch {
		case o.Type == "":
			o.Type = "luks2"
		case o.Type != "luks2":
			return nil, refuse(m.name, "give --header FILE (and --type luks2 or no --type)", "--type %s: %s is converted to LUKS2 only", o.Type, kind)
		}
	}
	target, what := o.NewKeyFile, "the new key file"
	switch o.Type {
	case "", "plain":
		if o.HeaderFile != "" {
			return nil, refuse(m.name, "add --type luks2 to turn the volume into LUKS2 with that header", "--header is for a conversion to LUKS2")
		}
		if o.NewKeyFile == "" {
			return nil, refuse(m.name, "give --new-key-file PATH: the new key is written there (a plain mapping has no header to keep it), or --type luks2 --header FILE", "a plain dm-crypt mapping needs a file for its new key")
		}
	case "luks2":
		if o.NewKeyFile != "" {
			return nil, refuse(m.name, "drop --new-key-file: the new key goes into the LUKS2 header", "--new-key-file with --type luks2")
		}
		if o.HeaderFile == "" && tc {
			return nil, refuse(m.name, "give --header FILE (and no --new-key-file): the LUKS2 header of the converted volume is kept apart from it", "%s turns into LUKS2 with a detached header only", kind)
		}
		if len(o.Passphrase) == 0 {
			return nil, refuse(m.name, "", "the new LUKS2 header needs a passphrase or key file")
		}
		target, what = o.HeaderFile, "the new header file"
	default:
		return nil, refuse(m.name, "", "--type %s: a plain mapping is rekeyed as plain or turned into luks2", o.Type)
	}
	onDisk := o.Type == "luks2" && target == ""
	if !onDisk && !filepath.IsAbs(target) {
		return nil, refuse(m.name, "", "%s %s must be an absolute path (resume reads it from the journal)", what, target)
	}
	if _, err := os.Lstat(target); err == nil && !onDisk {
		return nil, refuse(m.name, "choose a path that does not exist yet", "%s %s already exists", what, target)
	}
	if m.crypt.Key.IsEmpty() {
		return nil, refuse(m.name, "", "its table has no key")
	}
	keyring := m.crypt.Key.IsKeyring()
	if keyring && (tc || o.OldKey == nil) {
		return nil, refuse(m.name, "give the old key with --old-key-file FILE or, for a mapping opened with a passphrase, the hash it was opened with (--hash; the passphrase is then asked)",
			"its key is in the kernel keyring (%s), which no program can read back", m.crypt.Key.String())
	}
	if m.crypt.IVOffset != 0 && o.Type == "luks2" && !tc {
		return nil, refuse(m.name, "rekey it as plain (without --type luks2)", "its IV offset (--skip) is %d: a LUKS2 data segment starts at IV 0", m.crypt.IVOffset)
	}
	dpath, err := e.resolveDiskPath(m.disk, o.Target)
	if err != nil {
		return nil, refuse(m.name, "", "cannot find the device under it (%v): %v", m.disk, err)
	}
	di, err := e.Host.Stat(dpath)
	if err != nil {
		return nil, refuse(dpath, "", "the device under %s: %v", m.name, err)
	}
	off := Sectors(m.crypt.Offset)
	if off+m.size > di.Size {
		return nil, refuse(m.name, "", "its table (offset %d, %d sectors) runs past the end of %s (%d sectors)", off, m.size, dpath, di.Size)
	}
	if onDisk {
		if err := e.checkHeaderRoom(m, dpath, di, off); err != nil {
			return nil, err
		}
	}
	var tcRec *tcryptRecord
	if tc {
		if tcRec, err = e.checkTCrypt(m.name, m.crypt, m.size, dpath, di, o.Passphrase, o.PIM, o.TCryptKeyfiles); err != nil {
			return nil, err
		}
	}
	cs := CryptSpec{Cipher: string(m.crypt.Cipher), KeyBytes: m.crypt.Key.Size(), SectorSize: 512, IVOffset: Sectors(m.crypt.IVOffset), Opts: cryptOpts(m.crypt)}
	if m.crypt.SectorSize > 512 {
		cs.SectorSize, cs.IVLargeSectors = m.crypt.SectorSize, m.crypt.IVLargeSectors
	}
	align := Sectors(max(cs.SectorSize/512, 1))
	if m.size%align != 0 || off%align != 0 {
		return nil, refuse(m.name, "", "its size or offset is not a whole number of %d-byte sectors", cs.SectorSize)
	}
	ncs, err := rekeyCrypt(cs, o.Cipher, o.KeySize)
	if err != nil {
		return nil, refuse(m.name, "", "cannot rekey: %v", err)
	}
	var oldKey []byte
	if keyring {
		if oldKey, err = e.keyringOldKey(m, o.OldKey, cs, di.Dev, off); err != nil {
			return nil, err
		}
	} else {
		oldKey = m.crypt.Key.Bytes()
	}
	planned := false
	defer func() {
		if !planned {
			clear(oldKey)
		}
	}()
	if tc {
		ncs.IVOffset = 0 // a LUKS2 data segment starts at IV 0
	}
	// On a file system stored on the volume (directly, or on an LV of
	// its PV), the key would be locked inside what it opens.
	if onDisk {
		// The header goes on the disk itself, at the end of the run.
	} else if fd, err := e.Host.FileDevice(filepath.Dir(target)); err != nil {
		return nil, refuse(m.name, "", "cannot place %s %s: %v", what, target, err)
	} else if on, err := e.dependsOn(fd, m.disk); err != nil {
		return nil, err
	} else if on {
		return nil, refuse(m.name, "put it on a file system that is not on this volume", "%s %s would live on the volume being rekeyed: it could not be read to open the volume", what, target)
	}
	runID, err := newRunID()
	if err != nil {
		return nil, err
	}
	// A TrueCrypt source's new IV offset alone needs no probe.
	same := ncs
	same.IVOffset = cs.IVOffset
	if same != cs {
		if err := e.probeCrypt(runID, ncs, di.Dev, off, align); err != nil {
			var kr *kernelRefusal
			if errors.As(err, &kr) {
				return nil, refuse(m.name, "`cryptsetup benchmark --cipher SPEC --key-size BITS` tries a cipher", "cannot rekey: %v", err)
			}
			return nil, err
		}
	}

	// What is on the mapping: an LVM PV (its VG is fenced during the
	// run), or anything else (a mounted file system).
	node := e.Host.NodePath(m.name)
	pv, err := e.discoverInPlace(ctx, node)
	switch {
	case errors.Is(err, ErrNotPV):
		pv = nil
	case err != nil:
		return nil, err
	case pv.VG == "":
		pv = nil
	case pv.Refusal != "":
		return nil, refuse(node, "", "volume group %s cannot be converted: %s", pv.VG, pv.Refusal)
	}
	chunk := o.Chunk
	if chunk == 0 && !tc {
		chunk = DefaultPlainChunk
	}
	pg := PlainRekeyGeometry{DiskSize: di.Size, Offset: off, Size: m.size, Chunk: chunk, Align: align}
	build, newOff, newSize := BuildPlainRekey, off, m.size
	if tc {
		// Data at 0, to the end of the disk ("dynamic"): what
		// cryptsetup maps, and the final table.
		build, newOff, newSize = BuildTCryptRekey, 0, 0
	}
	if onDisk {
		newSize = 0 // to the end of the disk (checkHeaderRoom), as cryptsetup maps it
	}
	plan, err := build(pg)
	if err != nil {
		return nil, refuse(m.name, "", "%v", err)
	}
	plan.FinalHeaderOnDisk = onDisk
	jpath := o.Journal
	if jpath == "" {
		jpath = filepath.Join(DefaultJournalDir, "plain-"+m.name+".journal")
	}
	if err := e.checkNewJournal(jpath, di.Dev, dpath); err != nil {
		return nil, err
	}
	planned = true // oldKey is the plan's (or cleared below) from here on
	newKey := make([]byte, ncs.KeyBytes)
	if _, err := rand.Read(newKey); err != nil {
		clear(oldKey)
		return nil, err
	}
	rec := plainRecord{NewKeyFile: o.NewKeyFile, Salt: make([]byte, 32), OldCrypt: cs, Crypt: ncs}
	if tc {
		rec.TCrypt = tcRec
	}
	if _, err := rand.Read(rec.Salt); err != nil {
		clear(oldKey)
		clear(newKey)
		return nil, err
	}
	rec.OldDigest = plainDigest(rec.Salt, oldKey, "old")
	rec.NewDigest = plainDigest(rec.Salt, newKey, "new")
	ph := &plainHeader{rec: rec}
	var detached []byte
	if o.Type == "luks2" {
		lh, img, err := newDetachedHeader(o, ncs, newKey, newOff, newSize, Checkpoint{Run: runID, Op: "rekey", Plan: "forward", Journal: jpath})
		if err != nil {
			clear(oldKey)
			clear(newKey)
			return nil, refuse(m.name, "", "cannot make the LUKS2 header: %v", err)
		}
		ph.rec.HeaderFile, ph.lh, detached = o.HeaderFile, lh, img
		if onDisk {
			end := len(img)
			for end > 0 && img[end-1] == 0 {
				end--
			}
			ph.rec.OnDisk, ph.rec.Header, ph.rec.HeaderSize, detached = true, img[:end], int64(len(img)), nil
		}
	}
	spec := &Spec{
		Version: PlanVersion, ID: runID, Op: "rekey", Disk: di, Name: m.name,
		Helpers: map[BackingID]string{
			OldID: helperNamePrefix + runID + "-old",
			NewID: helperNamePrefix + runID + "-new",
		},
		Crypt: ncs, OldCrypt: cs, NewKeyFile: o.NewKeyFile, HeaderFile: o.HeaderFile, PlainTo: o.Type, TCrypt: tc,
		LUKSUUID: ph.UUID(),
		Forward:  plan,
	}
	ep := &EncryptPlan{Spec: spec, Journal: jpath, JournalFS: e.Host.MemoryFS(jpath), Header: ph,
		keys: map[BackingID][]byte{OldID: oldKey, NewID: newKey}}
	switch {
	case detached != nil:
		ep.newFile, ep.newFileData = o.HeaderFile, detached
	case !onDisk:
		ep.newFile, ep.newFileData = o.NewKeyFile, newKey
	}
	if pv != nil {
		spec.PVUUID, spec.VG, spec.VGDevices, spec.VGPVUUIDs, spec.VGSeqno, spec.PVDevice = pv.UUID, pv.VG, pv.VGDevices, pv.VGPVUUIDs, pv.VGSeqno, node
		ep.PV = pv
	}
	return ep, nil
}

// Plain reports whether the run is a plain dm-crypt rekey (no header).
func (s *Spec) Plain() bool { return s.Op == "rekey" && s.LUKSVersion == 0 }

// PlainRekeyGeometry is what the plain rekey builder needs to know.
type PlainRekeyGeometry struct {
	DiskSize Sectors // N
	Offset   Sectors // where the mapping's sector 0 is on the disk
	Size     Sectors // the mapping's size
	Chunk    Sectors
	Align    Sectors
}

// BuildPlainRekey returns the plan that re-encrypts a plain mapping in
// place: one in-place move over the whole mapping, from sector 0 up (the
// first chunk, rewritten first, hides the volume's file system or PV
// label from the old key's view while the run goes on), then finalize.
func BuildPlainRekey(pg PlainRekeyGeometry) (*Plan, error) {
	if err := pg.check(); err != nil {
		return nil, err
	}
	chunk := roundDown(pg.Chunk, max(pg.Align, 1))
	if chunk == 0 {
		return nil, fmt.Errorf("chunk size is smaller than the sector size")
	}
	return pg.oneMove(Device{ID: NewID, Phys: pg.Offset, Size: pg.Size}, chunk, true, "plain rekey")
}

// check refuses a mapping that is not whole blocks inside the disk.
func (pg PlainRekeyGeometry) check() error {
	a := max(pg.Align, 1)
	switch {
	case pg.Size == 0 || pg.Size%a != 0 || pg.Offset%a != 0:
		return fmt.Errorf("mapping of %d sectors at %d is not a non-zero whole number of %d-sector blocks", pg.Size, pg.Offset, a)
	case pg.Offset+pg.Size > pg.DiskSize:
		return fmt.Errorf("mapping [%d,%d) runs past the disk end %d", pg.Offset, pg.Offset+pg.Size, pg.DiskSize)
	}
	return nil
}

// oneMove is the verified plan of a run with one move of the whole
// mapping, from old (the mapping's sectors) to nd, in chunks (in place:
// the chunk's own sectors, rewritten with the mapping suspended), then
// finalize.
func (pg PlainRekeyGeometry) oneMove(nd Device, chunk Sectors, inPlace bool, what string) (*Plan, error) {
	g := Geometry{
		DiskSize: pg.DiskSize, Payload: pg.Size,
		Devices: []Device{
			{ID: DiskID, Phys: 0, Size: pg.DiskSize},
			{ID: OldID, Phys: pg.Offset, Size: pg.Size},
			nd,
		},
	}
	p := &Plan{
		Version: PlanVersion, Op: "rekey", Geometry: g,
		Phases: []Phase{
			{Kind: PhaseSetup},
			{Kind: PhaseMove, Start: 0, End: pg.Size, From: Backing{Dev: OldID}, To: Backing{Dev: NewID}, Chunk: chunk, InPlace: inPlace},
			{Kind: PhaseFinalize},
		},
		Initial: Layout{{Start: 0, End: pg.Size, On: Backing{Dev: OldID}}},
	}
	if !inPlace {
		if err := p.setDirections(); err != nil {
			return nil, err
		}
	}
	if err := p.Verify(); err != nil {
		return nil, fmt.Errorf("internal error: %s plan fails verification: %w", what, err)
	}
	return p, nil
}

// newDetachedHeader makes the LUKS2 header of a plain volume turned into
// LUKS2: the new key in keyslot 0 opened by the passphrase, the data
// segment at the plain mapping's offset and of its size, marked in
// progress (so cryptsetup refuses it until the run ends) and naming the
// run's journal. It returns the header and its image.
func newDetachedHeader(o PlainRekeyOptions, cs CryptSpec, key []byte, off, size Sectors, cp Checkpoint) (*LUKSHeader, []byte, error) {
	hs := o.HeaderSize
	if hs == 0 {
		hs = luks.DefaultLUKS2HeaderSize
	}
	if off > 0 {
		// The metadata and keyslots must end before the data segment
		// starts, even in a detached header (cryptsetup's rule).
		need := luks.MinHeaderSize(2, cs.KeyBytes, 0)
		if int64(off)*512 < need {
			return nil, nil, fmt.Errorf("the data starts %d bytes into the device, but a LUKS2 header, even a detached one, needs its metadata and a keyslot for a %d-bit key (%d bytes) to end before the data", off*512, cs.KeyBytes*8, need)
		}
		hs = min(hs, int64(off)*512)
	}
	vk := luks.NewVolumeKeyFromBytes(key)
	defer vk.Wipe()
	h, err := luks.Create(luks.Options{Version: 2, Cipher: cs.Cipher, SectorSize: int(cs.SectorSize), HeaderSize: hs, PBKDF: o.PBKDF}, vk, o.Passphrase)
	if err != nil {
		return nil, nil, err
	}
	if err := h.SetDetachedSegment(int64(off)*512, int64(size)*512); err != nil {
		return nil, nil, err
	}
	lh, err := NewLUKSHeader(h)
	if err != nil {
		return nil, nil, err
	}
	img, err := lh.Image(cp)
	if err != nil {
		return nil, nil, err
	}
	return lh, img, nil
}

// checkHeaderRoom: a plain mapping at offset off of its disk whose LUKS2
// header is to go on the disk, before the data. The mapping must run to
// the end of the disk (cryptsetup maps a LUKS2 segment there), no other
// device-mapper device may use the disk, and the sectors before the data
// must not hold something a tool would recognise (an LVM label, a LUKS
// header): they are overwritten at the end of the run.
func (e *Engine) checkHeaderRoom(m *cryptMapping, dpath string, di DiskInfo, off Sectors) error {
	if off == 0 {
		return refuse(m.name, "give --header FILE for a detached header", "its data starts at sector 0 of %s: there is no room for a LUKS2 header before it", dpath)
	}
	if off+m.size != di.Size {
		return refuse(m.name, "give --header FILE for a detached header", "it ends %d sectors before the end of %s, but a LUKS2 segment with its header on the disk runs to the end", di.Size-off-m.size, dpath)
	}
	list, err := e.DM.List()
	if err != nil {
		return err
	}
	for _, d := range list {
		if d.Name == m.name {
			continue
		}
		deps, err := e.DM.Deps(d.Name)
		if err != nil {
			continue
		}
		for _, x := range deps {
			if x == di.Dev {
				return refuse(dpath, "give --header FILE for a detached header", "device-mapper device %s uses it too: the sectors before the data may be its", d.Name)
			}
		}
	}
	disk, err := e.Host.OpenDisk(dpath)
	if err != nil {
		return fmt.Errorf("opening %s: %w", dpath, err)
	}
	first := make([]byte, labelSectors*512)
	_, rerr := disk.ReadAt(first, 0)
	disk.Close()
	if rerr != nil {
		return fmt.Errorf("reading the start of %s: %w", dpath, rerr)
	}
	if id := Identify(first); id != IdentityUnknown {
		return refuse(dpath, "give --header FILE for a detached header, or clear the start of the disk if it is unused", "its first sectors, before the data, hold %v, which the LUKS2 header would overwrite", id)
	}
	return nil
}

// keyringOldKey gets the old key of a plain mapping whose table names a
// kernel keyring key from get, and checks it against the live mapping: a
// private crypt device (only read) with that key over the same sectors must
// read what the mapping reads (sampled across it; a sample that differs
// is read again, as the volume is in use). A wrong key reads noise.
func (e *Engine) keyringOldKey(m *cryptMapping, get func(int) ([]byte, error), cs CryptSpec, disk dmtable.Dev, off Sectors) ([]byte, error) {
	k, err := get(m.crypt.Key.Size())
	if err != nil {
		return nil, err
	}
	if len(k) != m.crypt.Key.Size() {
		n := len(k)
		clear(k)
		return nil, refuse(m.name, "", "the old key given is %d bytes; its table's key is %d", n, m.crypt.Key.Size())
	}
	if err := e.checkOldKey(m, k, cs, disk, off); err != nil {
		clear(k)
		return nil, err
	}
	return k, nil
}

// keyCheckSamples is how many places of a mapping checkOldKey compares.
const keyCheckSamples = 16

func (e *Engine) checkOldKey(m *cryptMapping, k []byte, cs CryptSpec, disk dmtable.Dev, off Sectors) (err error) {
	id, err := newRunID()
	if err != nil {
		return err
	}
	hk := dmtable.HexKey(k)
	defer hk.Wipe()
	name, uuid := transientDevice(id, "keycheck")
	t := dmtable.Table{cryptTarget(0, m.size, cs, hk, 0, disk, off)}
	if _, err := e.DM.Create(name, uuid, t); err != nil {
		return fmt.Errorf("%s: creating %s to check the old key: %w", m.name, name, err)
	}
	defer func() {
		if rerr := e.DM.Remove(name); rerr != nil {
			err = errors.Join(err, fmt.Errorf("%s: removing %s (dmsetup remove it): %w", m.name, name, rerr))
		}
	}()
	live, err := e.Host.OpenDisk(e.Host.NodePath(m.name))
	if err != nil {
		return err
	}
	defer live.Close()
	probe, err := e.Host.OpenDisk(e.Host.NodePath(name))
	if err != nil {
		return err
	}
	defer probe.Close()
	bs := int64(max(cs.SectorSize, 512))
	n := int64(m.size) * 512 / bs
	a, b := make([]byte, bs), make([]byte, bs)
	defer clear(a)
	defer clear(b)
	for i := int64(0); i < keyCheckSamples; i++ {
		at := (n - 1) * i / (keyCheckSamples - 1) * bs
		same := false
		for try := 0; try < 5 && !same; try++ {
			if try > 0 {
				time.Sleep(20 * time.Millisecond)
			}
			if _, err := live.ReadAt(a, at); err != nil {
				return fmt.Errorf("%s: reading it to check the old key: %w", m.name, err)
			}
			if _, err := probe.ReadAt(b, at); err != nil {
				return fmt.Errorf("%s: reading %s to check the old key: %w", m.name, name, err)
			}
			same = bytes.Equal(a, b)
		}
		if !same {
			return fmt.Errorf("%s: the old key given is not its key (byte %d reads differently with it): %w", m.name, at, ErrWrongPassphrase)
		}
	}
	return nil
}
