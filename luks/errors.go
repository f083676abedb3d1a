package luks

import "errors"

// Sentinel errors. Every error returned by this package wraps one of these
// (or an I/O error from the caller's reader/writer) so callers can branch
// with errors.Is. Messages never contain key material.
var (
	// ErrNotLUKS: the data does not start with a LUKS1, LUKS2 or disguised
	// (dmconvert in-progress) LUKS1 header.
	ErrNotLUKS = errors.New("not a LUKS header")
	// ErrCorrupt: a header was recognised but is damaged or inconsistent
	// (bad checksum, invalid JSON, overlapping areas, ...).
	ErrCorrupt = errors.New("corrupt LUKS header")
	// ErrUnsupported: a valid header uses a feature this package does not
	// implement (an unknown cipher, KDF, hash, keyslot or segment type).
	ErrUnsupported = errors.New("unsupported LUKS feature")
	// ErrWrongPassphrase: no keyslot could be opened with the given
	// passphrase or key file.
	ErrWrongPassphrase = errors.New("no keyslot matches this passphrase")
	// ErrNoKeyslot: the header has no usable keyslot for the request
	// (for example no keyslot bound to the data segment, or the keyslot
	// number given is not active).
	ErrNoKeyslot = errors.New("no usable keyslot")
	// ErrNoSpace: no free keyslot number, keyslot area, JSON space or
	// checkpoint room is left.
	ErrNoSpace = errors.New("no space left in LUKS header")
	// ErrInvalidArgument: a caller-supplied option is out of range.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrSectorSize: the header's encryption sector size does not match
	// the device's logical block size.
	ErrSectorSize = errors.New("sector size mismatch")
	// ErrWrongKey: a volume key given by the caller does not verify
	// against the header's digest.
	ErrWrongKey = errors.New("volume key does not match the header digest")
	// ErrNoCheckpoint: no valid dmconvert checkpoint is recorded.
	ErrNoCheckpoint = errors.New("no dmconvert checkpoint")
	// ErrKeyInput: a passphrase or key file could not be read under
	// cryptsetup's rules (too large, short read, nothing on input, ...).
	ErrKeyInput = errors.New("cannot read key")
)
