package luks

import (
	"bytes"
	"fmt"
	"io"
	"os"
)

// Header backups use cryptsetup's file format: a raw copy of the start of
// the device. LUKS2 (luksHeaderBackup): both metadata copies and the
// keyslots area, 2*MetadataSize+KeyslotsSize bytes rounded up to 4 KiB.
// LUKS1: everything up to the end of the keyslot material rounded up to
// 4 KiB, with the bytes between the 1024-byte phdr and the first keyslot
// zeroed when that keyslot starts at 4 KiB.

func (h *Header) backupSize() int64 {
	if h.v1 != nil {
		return int64(alignUp(h.v1.materialEnd(), 4096))
	}
	ksz, _ := h.v2.keyslotsSize()
	return int64(alignUp(2*h.v2.hdrSize+ksz, 4096))
}

// BackupImage returns the backup file contents for this in-memory header
// (what Backup would produce after WriteHeader).
func (h *Header) BackupImage() ([]byte, error) {
	img, err := h.Image()
	if err != nil {
		return nil, err
	}
	n := h.backupSize()
	if int64(len(img)) < n {
		img = append(img, make([]byte, n-int64(len(img)))...)
	}
	b := img[:n]
	if h.v1 != nil {
		h.zeroLUKS1Gap(b)
	}
	return b, nil
}

func (h *Header) zeroLUKS1Gap(b []byte) {
	if h.firstMaterialOffset() == luks1AlignKeyslot {
		clear(b[luks1PhdrPadded:luks1AlignKeyslot])
	}
}

// Backup validates the header at the start of r and writes a
// cryptsetup-compatible backup of it to path, which must not exist
// (created with mode 0400, like cryptsetup's).
func Backup(r io.ReaderAt, path string) error {
	h, err := Read(r)
	if err != nil {
		return fmt.Errorf("header backup: %w", err)
	}
	b, err := readAt(r, 0, int(h.backupSize()))
	if err != nil {
		return fmt.Errorf("header backup: reading %d bytes: %w", h.backupSize(), err)
	}
	if h.v1 != nil {
		h.zeroLUKS1Gap(b)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o400)
	if err != nil {
		return fmt.Errorf("header backup: %w", err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("header backup %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("header backup %s: %w", path, err)
	}
	return f.Close()
}

// ReadWriterAt is what Restore needs of a device.
type ReadWriterAt interface {
	io.ReaderAt
	io.WriterAt
}

// Restore writes the header from the backup file path to the start of
// dev. Like cryptsetup it refuses a backup that is not a valid header,
// and, if dev already holds a valid header, one whose data offset, key
// size or header area size differs. It writes exactly the header and
// keyslot areas (never data).
func Restore(path string, dev ReadWriterAt) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("header restore: %w", err)
	}
	h, err := Read(bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("header restore: backup %s: %w", path, err)
	}
	var n int64
	if h.v2 != nil {
		ksz, _ := h.v2.keyslotsSize()
		n = int64(2*h.v2.hdrSize + ksz)
	} else {
		n = int64(h.v1.materialEnd())
	}
	if int64(len(b)) < n {
		return fmt.Errorf("header restore: backup %s is %d bytes, header needs %d: %w", path, len(b), n, ErrCorrupt)
	}
	if cur, err := Read(dev); err == nil {
		if cur.Version() != h.Version() || cur.DataOffset() != h.DataOffset() ||
			cur.VolumeKeySize() != h.VolumeKeySize() || cur.HeaderSize() != h.HeaderSize() {
			return fmt.Errorf("header restore: device header (LUKS%d, data offset %d, key %d bytes) differs from backup (LUKS%d, data offset %d, key %d bytes): %w",
				cur.Version(), cur.DataOffset(), cur.VolumeKeySize(), h.Version(), h.DataOffset(), h.VolumeKeySize(), ErrInvalidArgument)
		}
	}
	if err := writeFull(dev, b[:n], 0); err != nil {
		return fmt.Errorf("header restore: %w", err)
	}
	return syncIfPossible(dev)
}

// CheckSectorSize refuses a header whose encryption sector size differs
// from the device's logical block size (dm-crypt on a device with a
// larger logical block size than the header's sector size, or a smaller
// one, changes the I/O granularity the file systems on it rely on).
func CheckSectorSize(h *Header, logicalBlockSize int) error {
	if ss := h.SectorSize(); ss != logicalBlockSize {
		hint := fmt.Sprintf("create the header with sector size %d", logicalBlockSize)
		if h.Version() == 1 && logicalBlockSize != sectorSize {
			hint = "LUKS1 only supports 512-byte sectors; use LUKS2"
		}
		return fmt.Errorf("LUKS sector size %d does not match the device's logical block size %d (%s): %w",
			ss, logicalBlockSize, hint, ErrSectorSize)
	}
	return nil
}
