package luks_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/dmconvert/dmconvert/luks"
)

// memDisk is a toy device for the example.
type memDisk struct{ b []byte }

func (d *memDisk) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(d.b)) {
		return 0, io.EOF
	}
	n := copy(p, d.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (d *memDisk) WriteAt(p []byte, off int64) (int, error) { return copy(d.b[off:], p), nil }

// The encrypt flow as the engine drives it (design.md sections 1 and 3).
func Example_encrypt() {
	disk := &memDisk{b: make([]byte, 20<<20)}
	cheap := luks.PBKDF{Type: luks.KDFArgon2id, Iterations: 4, MemoryKiB: 32768}

	// Before data moves: a header for a volume key we chose, marked in
	// progress, carrying the first checkpoint.
	vk, _ := luks.NewVolumeKey(64)
	defer vk.Wipe()
	h, _ := luks.Create(luks.Options{PBKDF: cheap, HeaderSize: 1 << 20}, vk, []byte("passphrase"))
	_ = h.SetRequirement(luks.RequirementDmconvert)
	_ = h.SetCheckpoint([]byte("phase 3"))
	_ = luks.CheckSectorSize(h, 512) // the device's logical block size

	// Identity switch: the first 4 KiB first, then the rest.
	_ = h.WriteHeader(disk, luks.FirstBlockFirst)

	// Per-step checkpoints rewrite both metadata copies only.
	_ = h.SaveCheckpoint(disk, []byte("phase 4, boundary 2048"))

	// Resume: the header on disk gives the key back, checkpoint included.
	back, _ := luks.Read(disk)
	key, _, _ := back.Unlock([]byte("passphrase"))
	cp, _ := back.Checkpoint()
	fmt.Println(key.Equal(vk), string(cp), back.Requirements())
	key.Wipe()

	// Finalize: clear the requirement and the token in one metadata write.
	_ = back.ClearRequirement(luks.RequirementDmconvert)
	back.RemoveCheckpoint()
	_ = back.WriteMetadata(disk)
	done, _ := luks.Read(disk)
	_, err := done.Checkpoint()
	fmt.Println(done.Requirements(), errors.Is(err, luks.ErrNoCheckpoint))

	// A wrong passphrase is a typed error.
	_, _, err = done.Unlock([]byte("wrong"))
	fmt.Println(errors.Is(err, luks.ErrWrongPassphrase), bytes.Contains([]byte(fmt.Sprint(vk)), []byte("redacted")))
	// Output:
	// true phase 4, boundary 2048 [dmconvert]
	// [] true
	// true true
}
