package luks

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
)

// VolumeKey is the key that encrypts the data segment. It lives in memory
// only. It cannot be printed: String, GoString and every fmt verb print a
// redaction, and JSON/text marshalling fail. The bytes sit behind a
// pointer so that even reflection-based printing of a struct that embeds
// a VolumeKey in an unexported field shows an address, not the key.
//
// Call Wipe when the key is no longer needed. Go may have copied the
// bytes during garbage collection or into registers; Wipe clears the one
// buffer this type owns, which is the best Go allows.
type VolumeKey struct {
	s *secret
}

type secret struct {
	b []byte
}

// MaxVolumeKeySize is the largest volume key accepted (LUKS2 allows
// longer keys in theory; dm-crypt ciphers we support need at most 64).
const MaxVolumeKeySize = 128

// NewVolumeKey returns a fresh random volume key of size bytes.
func NewVolumeKey(size int) (*VolumeKey, error) {
	if size <= 0 || size > MaxVolumeKeySize {
		return nil, fmt.Errorf("volume key size %d bytes: %w", size, ErrInvalidArgument)
	}
	b := make([]byte, size)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("generating volume key: %w", err)
	}
	return &VolumeKey{s: &secret{b: b}}, nil
}

// NewVolumeKeyFromBytes copies b into a new VolumeKey. The caller should
// wipe its own copy (see Wipe).
func NewVolumeKeyFromBytes(b []byte) *VolumeKey {
	c := make([]byte, len(b))
	copy(c, b)
	return &VolumeKey{s: &secret{b: c}}
}

// Len returns the key size in bytes (0 after Wipe).
func (k *VolumeKey) Len() int {
	if k == nil || k.s == nil {
		return 0
	}
	return len(k.s.b)
}

// Bytes returns the key itself, not a copy. Do not retain or log it; it
// is zeroed by Wipe.
func (k *VolumeKey) Bytes() []byte {
	if k == nil || k.s == nil {
		return nil
	}
	return k.s.b
}

// AppendHex appends the lower-case hex form of the key to dst, the form
// dm-crypt tables take. The caller owns (and should wipe) the result.
func (k *VolumeKey) AppendHex(dst []byte) []byte {
	b := k.Bytes()
	n := len(dst)
	dst = append(dst, make([]byte, hex.EncodedLen(len(b)))...)
	hex.Encode(dst[n:], b)
	return dst
}

// Equal reports in constant time whether two keys are identical.
func (k *VolumeKey) Equal(o *VolumeKey) bool {
	a, b := k.Bytes(), o.Bytes()
	return len(a) == len(b) && subtle.ConstantTimeCompare(a, b) == 1
}

// Clone returns an independent copy.
func (k *VolumeKey) Clone() *VolumeKey { return NewVolumeKeyFromBytes(k.Bytes()) }

// Wipe zeroes the key and releases it. Safe to call more than once.
func (k *VolumeKey) Wipe() {
	if k == nil || k.s == nil {
		return
	}
	wipe(k.s.b)
	k.s.b = nil
}

// String implements fmt.Stringer with a redaction.
func (k VolumeKey) String() string {
	n := 0
	if k.s != nil {
		n = len(k.s.b) * 8
	}
	return fmt.Sprintf("luks.VolumeKey(%d bits, redacted)", n)
}

// GoString implements fmt.GoStringer with a redaction.
func (k VolumeKey) GoString() string { return k.String() }

// Format makes every fmt verb (%v %s %x %q %#v ...) print the redaction.
func (k VolumeKey) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(k.String())) }

var errMarshalKey = errors.New("luks: refusing to marshal a volume key")

// MarshalJSON refuses to serialise the key.
func (k VolumeKey) MarshalJSON() ([]byte, error) { return nil, errMarshalKey }

// MarshalText refuses to serialise the key.
func (k VolumeKey) MarshalText() ([]byte, error) { return nil, errMarshalKey }

// wipe zeroes b. clear is not elided by the compiler for a slice that
// escapes, which every key buffer here does.
func wipe(b []byte) { clear(b) }

// WipeBytes zeroes a passphrase or key-file buffer the caller owns.
func WipeBytes(b []byte) { wipe(b) }
