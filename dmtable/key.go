package dmtable

import (
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
)

// Key is a dm-crypt key as a crypt table carries it: hex key material, a
// reference to a key in the kernel keyring (":<size>:<type>:<description>"),
// or no key at all ("-", for cipher_null).
//
// Key never prints its material: String, %v, %#v, %s, %x and %q all give
// the masked form that `dmsetup table` prints without --showkeys (one '0'
// per hex digit), or the keyring reference, which names a key without
// revealing it. The material goes into the kernel only through Payload,
// which the Client calls when it loads a table.
//
// Copies of a Key share their material: Wipe on any copy zeroes it for all.
type Key struct {
	raw []byte // hex key material; nil for keyring references and no key

	ringSize int    // key size in bytes, keyring reference only
	ringType string // "logon", "user", "encrypted", "trusted"
	ringDesc string
}

// HexKey is a key given by its bytes. It copies b; the caller should wipe
// its own copy.
func HexKey(b []byte) Key {
	if len(b) == 0 {
		return Key{}
	}
	return Key{raw: append([]byte(nil), b...)}
}

// KeyringKey references a key of the given size in bytes, type ("logon",
// "user", "encrypted" or "trusted") and description in the kernel keyring.
func KeyringKey(size int, typ, desc string) Key {
	return Key{ringSize: size, ringType: typ, ringDesc: desc}
}

// ParseKey parses the key field of a crypt table: hex digits, a keyring
// reference, or "-".
func ParseKey(s string) (Key, error) {
	switch {
	case s == "-":
		return Key{}, nil
	case strings.HasPrefix(s, ":"):
		parts := strings.SplitN(s[1:], ":", 3)
		if len(parts) != 3 {
			return Key{}, fmt.Errorf("keyring key reference: want :<size>:<type>:<description>")
		}
		size, err := parseUint(parts[0], 31)
		if err != nil || size == 0 {
			return Key{}, fmt.Errorf("keyring key reference: bad key size")
		}
		if parts[1] == "" || parts[2] == "" {
			return Key{}, fmt.Errorf("keyring key reference: empty type or description")
		}
		return KeyringKey(int(size), parts[1], parts[2]), nil
	default:
		if len(s)%2 != 0 {
			return Key{}, fmt.Errorf("hex key has an odd number of digits")
		}
		for i := 0; i < len(s); i++ {
			c := s[i]
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				// Upper case is refused too: the kernel prints lower case,
				// and accepting it would break the print/parse round trip.
				return Key{}, fmt.Errorf("hex key has a character that is not a lower-case hex digit")
			}
		}
		b := make([]byte, len(s)/2)
		if _, err := hex.Decode(b, []byte(s)); err != nil {
			return Key{}, fmt.Errorf("hex key: %w", err)
		}
		return Key{raw: b}, nil
	}
}

// IsKeyring reports whether k references a keyring key.
func (k Key) IsKeyring() bool { return k.ringType != "" }

// IsEmpty reports whether k is "no key" ("-").
func (k Key) IsEmpty() bool { return len(k.raw) == 0 && !k.IsKeyring() }

// Size is the key size in bytes.
func (k Key) Size() int {
	if k.IsKeyring() {
		return k.ringSize
	}
	return len(k.raw)
}

// Keyring returns the type and description of a keyring reference.
func (k Key) Keyring() (typ, desc string, ok bool) {
	return k.ringType, k.ringDesc, k.IsKeyring()
}

// Wipe zeroes the key material (shared by every copy of k).
func (k Key) Wipe() {
	clear(k.raw)
}

// Equal compares two keys; hex material is compared in constant time.
func (k Key) Equal(o Key) bool {
	if k.IsKeyring() || o.IsKeyring() {
		return k.ringSize == o.ringSize && k.ringType == o.ringType && k.ringDesc == o.ringDesc
	}
	return len(k.raw) == len(o.raw) && subtle.ConstantTimeCompare(k.raw, o.raw) == 1
}

// Payload is the key field as the kernel wants it, with the material in
// hex. Only the Client should call it.
func (k Key) Payload() string {
	switch {
	case k.IsKeyring():
		return ":" + strconv.Itoa(k.ringSize) + ":" + k.ringType + ":" + k.ringDesc
	case len(k.raw) == 0:
		return "-"
	default:
		return hex.EncodeToString(k.raw)
	}
}

// String is the masked form: a keyring reference as is, hex material as
// one '0' per digit (what `dmsetup table` prints without --showkeys).
func (k Key) String() string {
	switch {
	case k.IsKeyring():
		return k.Payload()
	case len(k.raw) == 0:
		return "-"
	default:
		return strings.Repeat("0", 2*len(k.raw))
	}
}

// GoString masks the key for %#v.
func (k Key) GoString() string {
	if k.IsKeyring() {
		return fmt.Sprintf("dmtable.KeyringKey(%d, %q, %q)", k.ringSize, k.ringType, k.ringDesc)
	}
	return fmt.Sprintf("dmtable.Key{redacted %d bytes}", len(k.raw))
}

// Format makes every fmt verb print the masked form.
func (k Key) Format(f fmt.State, verb rune) {
	if verb == 'v' && f.Flag('#') {
		fmt.Fprint(f, k.GoString())
		return
	}
	fmt.Fprint(f, k.String())
}

// Bytes returns a copy of hex key material (nil for a keyring reference
// or no key). The caller owns and should wipe the copy.
func (k Key) Bytes() []byte {
	if len(k.raw) == 0 {
		return nil
	}
	return append([]byte(nil), k.raw...)
}
