package convert

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/luks"
)

// TrueCrypt and VeraCrypt sources (docs/design.md section 10).
//
// cryptsetup opens a TrueCrypt volume (`--type tcrypt`) as one crypt
// mapping with the data key in its table, its data at the header's
// offset (256 sectors for a normal volume) and the IV offset equal to it.
// The volume turns into LUKS2 with a detached header: a LUKS2 data
// segment starts at IV 0, and a LUKS2 header cannot end its keyslots in
// the 128 KiB before the data, even detached. So the data moves to the
// start of the disk while it is re-encrypted: the plain rekey's run (the
// journal record, the detached header marked in progress until the end)
// with the moving gap of a LUKS2 rekey (section 8), the gap being the
// TrueCrypt header area.

const tcryptUUIDPrefix = "CRYPT-TCRYPT-"

// tcryptRecord is what the journal keeps of a TrueCrypt source.
type tcryptRecord struct {
	// Head is the disk's first Offset sectors as they were (the volume
	// header, encrypted with the passphrase, and the hidden-volume header
	// area). The first chunk overwrites them: an abort writes them back,
	// and a resume after a reboot gets the old key from them with the
	// passphrase.
	Head []byte `json:"head"`
	// Offset and Size are the old data area (sectors); DiskSize the disk.
	Offset   Sectors `json:"offset"`
	Size     Sectors `json:"size"`
	DiskSize Sectors `json:"disk_size"`
	// PRF and Iterations are the header's PBKDF2 variant, so a resume
	// derives one key, not every variant's.
	PRF        string `json:"prf"`
	Iterations int    `json:"iterations"`
	// Keyfiles are the paths of the volume's TrueCrypt keyfiles (their
	// contents are not kept: a resume reads them again).
	Keyfiles []string `json:"keyfiles,omitempty"`
}

// readTCryptKeyfiles reads what counts of each keyfile (its first MiB).
func readTCryptKeyfiles(paths []string) ([][]byte, error) {
	var out [][]byte
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return nil, fmt.Errorf("TrueCrypt keyfile: %w", err)
		}
		b, err := io.ReadAll(io.LimitReader(f, luks.TCryptKeyfileMax))
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("TrueCrypt keyfile %s: %w", p, err)
		}
		out = append(out, b)
	}
	return out, nil
}

func wipeAll(bs [][]byte) {
	for _, b := range bs {
		clear(b)
	}
}

// IsTCryptMapping reports whether target is an open TrueCrypt/VeraCrypt
// mapping (cryptsetup's CRYPT-TCRYPT- UUID), without refusing anything.
func (e *Engine) IsTCryptMapping(target string) bool {
	m, err := e.findMapping(target)
	return err == nil && strings.HasPrefix(m.info.UUID, tcryptUUIDPrefix)
}

// checkTCrypt checks an open TrueCrypt mapping against its volume header
// before anything is written: the table must be the one cryptsetup makes
// for a normal volume, and the passphrase must open the header at the
// start of the disk to the key the mapping uses. It returns the disk's
// first off sectors (the header area).
func (e *Engine) checkTCrypt(name string, c *dmtable.Crypt, size Sectors, dpath string, di DiskInfo, pass []byte, pim int, keyfiles []string) (*tcryptRecord, error) {
	off := Sectors(c.Offset)
	switch {
	case off == 0 && c.IVOffset != 0:
		// cryptsetup maps a cascade as one device per cipher: the outer
		// ones start at 0 of the device under them, IVs from the offset.
		return nil, refuse(name, "a cascade cannot become one LUKS2 segment here: copy the data to a new LUKS2 volume",
			"its table maps the device under it from offset 0 with IV offset %d, as cryptsetup maps the outer ciphers of a TrueCrypt/VeraCrypt cipher cascade (one device per cipher): cascades are not supported", c.IVOffset)
	case off == 0 || Sectors(c.IVOffset) != off:
		return nil, refuse(name, "", "its table (offset %d, IV offset %d) is not how cryptsetup maps a TrueCrypt volume", c.Offset, c.IVOffset)
	case c.SectorSize > 512:
		return nil, refuse(name, "", "its sector size is %d: TrueCrypt volumes use 512", c.SectorSize)
	case off+size > di.Size:
		return nil, refuse(name, "", "its data area (%d sectors at %d) runs past the end of %s (%d sectors)", size, off, dpath, di.Size)
	case len(pass) == 0:
		return nil, refuse(name, "", "the passphrase of the TrueCrypt volume is needed: it opens the volume's header and then the new LUKS2 header")
	}
	if _, ok := c.Dev.Dev(); !ok {
		return nil, refuse(name, "", "it is not over a block device")
	}
	disk, err := e.Host.OpenDisk(dpath)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dpath, err)
	}
	head := make([]byte, off*512)
	_, rerr := disk.ReadAt(head, 0)
	disk.Close()
	if rerr != nil {
		return nil, fmt.Errorf("reading the TrueCrypt header of %s: %w", dpath, rerr)
	}
	kfs, err := readTCryptKeyfiles(keyfiles)
	if err != nil {
		return nil, refuse(name, "", "%v", err)
	}
	defer wipeAll(kfs)
	h, err := luks.OpenTCryptWith(head, pass, luks.TCryptOpen{PIM: pim, Keyfiles: kfs})
	if errors.Is(err, luks.ErrWrongPassphrase) {
		return nil, refuse(dpath, "give the passphrase, keyfiles (--tcrypt-keyfile) and VeraCrypt PIM (--veracrypt-pim) the volume was opened with (hidden volumes and cipher cascades are not supported)", "%v: the passphrase does not open the TrueCrypt/VeraCrypt header at its start", ErrWrongPassphrase)
	} else if err != nil {
		return nil, refuse(dpath, "", "its TrueCrypt/VeraCrypt header: %v", err)
	}
	defer clear(h.Key)
	key := c.Key.Bytes()
	defer clear(key)
	switch {
	case subtle.ConstantTimeCompare(h.Key, key) != 1:
		return nil, refuse(name, "", "the TrueCrypt header at the start of %s does not hold the key mapping %s uses (a hidden volume, or another volume's header)", dpath, name)
	case h.DataOffset != int64(off)*512 || h.DataSize != int64(size)*512:
		return nil, refuse(name, "", "its table (%d sectors at %d) is not the data area its TrueCrypt header describes (%d bytes at %d)", size, off, h.DataSize, h.DataOffset)
	case h.Cipher != string(c.Cipher):
		return nil, refuse(name, "", "its cipher %s is not its TrueCrypt header's (%s)", c.Cipher, h.Cipher)
	}
	abs := make([]string, 0, len(keyfiles))
	for _, k := range keyfiles {
		a, err := filepath.Abs(k)
		if err != nil {
			return nil, refuse(name, "", "TrueCrypt keyfile %s: %v", k, err)
		}
		abs = append(abs, a)
	}
	return &tcryptRecord{Head: head, Offset: off, Size: size, DiskSize: di.Size, PRF: h.PRF, Iterations: h.Iterations, Keyfiles: abs}, nil
}

// tcryptOldKey gets a TrueCrypt source's old key from the header area the
// journal kept, with the passphrase.
func (r *tcryptRecord) oldKey(pass []byte) ([]byte, error) {
	kfs, err := readTCryptKeyfiles(r.Keyfiles)
	if err != nil {
		return nil, err
	}
	defer wipeAll(kfs)
	h, err := luks.OpenTCryptWith(r.Head, pass, luks.TCryptOpen{PRF: r.PRF, Iterations: r.Iterations, Keyfiles: kfs})
	if errors.Is(err, luks.ErrWrongPassphrase) {
		return nil, fmt.Errorf("%w: it (with the keyfiles the run began with, if any) does not open the TrueCrypt header this run kept", ErrWrongPassphrase)
	} else if err != nil {
		return nil, fmt.Errorf("the TrueCrypt header this run kept: %w", err)
	}
	return h.Key, nil
}

// finalWrites are the disk writes that end a TrueCrypt source's run. A
// finished conversion zeroes what is left of the old volume after the
// new data area: the old ciphertext of the last chunk's source and the
// backup headers (which the passphrase would still open to the old key).
// An abort writes the header area back: the volume is the TrueCrypt
// volume it was.
func (r *tcryptRecord) finalWrites(rekeyed bool) []Write {
	if !rekeyed {
		return []Write{{Off: 0, Data: r.Head, Flush: true}}
	}
	end := min(r.DiskSize, r.Size+2*r.Offset)
	if end <= r.Size {
		return nil
	}
	return []Write{{Off: int64(r.Size) * 512, Data: make([]byte, (end-r.Size)*512), Flush: true}}
}

// BuildTCryptRekey returns the plan that re-encrypts a TrueCrypt volume
// and moves its data to the start of the disk: one move from old (the
// data at pg.Offset, the old key) to new (at 0, the new key), forward in
// chunks of at most pg.Offset (the header area is the gap), then
// finalize: the mapping becomes the new key's whole disk.
func BuildTCryptRekey(pg PlainRekeyGeometry) (*Plan, error) {
	if err := pg.check(); err != nil {
		return nil, err
	}
	if pg.Offset == 0 || pg.Offset%labelSectors != 0 {
		return nil, fmt.Errorf("data offset %d sectors leaves no gap of whole 4 KiB blocks to move the data into", pg.Offset)
	}
	chunk := pg.Offset
	if pg.Chunk != 0 {
		chunk = min(pg.Chunk, pg.Offset)
	}
	if chunk = roundDown(chunk, max(pg.Align, 1)); chunk == 0 {
		return nil, fmt.Errorf("chunk size is smaller than the sector size")
	}
	// The new data area runs to the end of the disk: cryptsetup maps a
	// LUKS2 data segment to the end of the device (it does not limit it
	// to a fixed segment size), so the mapping grows by the TrueCrypt
	// header areas at the end.
	return pg.oneMove(Device{ID: NewID, Phys: 0, Size: pg.DiskSize}, chunk, false, "TrueCrypt conversion")
}
