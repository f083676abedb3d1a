package luks

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"hash"
	"strconv"
	"strings"

	"golang.org/x/crypto/ripemd160" //nolint:staticcheck // cryptsetup's plain-mode default hash
)

// DefaultPlainHash is the passphrase hash cryptsetup uses for plain mode
// when none is given (cryptsetup 2.6's build default; checked in the test
// VM by TestGuestPlainHash).
const DefaultPlainHash = "ripemd160"

// plainHashes are the hashes PlainKey implements.
var plainHashes = map[string]func() hash.Hash{
	"sha1":      sha1.New,
	"sha224":    sha256.New224,
	"sha256":    sha256.New,
	"sha384":    sha512.New384,
	"sha512":    sha512.New,
	"ripemd160": ripemd160.New,
}

// PlainKey makes the volume key of a plain dm-crypt mapping from a
// passphrase the way cryptsetup's plain mode does for a passphrase (not a
// key file, which plain mode uses as the key itself). spec is --hash's
// value: a hash name, optionally ":N" to make only the first N bytes and
// zero the rest; "plain" uses the passphrase's bytes directly.
//
// The key is made in rounds of one digest each: round r hashes r bytes
// 'A' and then the passphrase, and the rounds' digests (the last one
// truncated) are concatenated until keyBytes are made.
func PlainKey(spec string, passphrase []byte, keyBytes int) ([]byte, error) {
	if keyBytes <= 0 {
		return nil, fmt.Errorf("plain key size %d bytes: %w", keyBytes, ErrInvalidArgument)
	}
	name, n := spec, keyBytes
	if i := strings.IndexByte(spec, ':'); i >= 0 {
		name = spec[:i]
		v, err := strconv.Atoi(spec[i+1:])
		if err != nil || v <= 0 {
			return nil, fmt.Errorf("hash %q: the length after ':' is not a positive number: %w", spec, ErrInvalidArgument)
		}
		if v > keyBytes {
			return nil, fmt.Errorf("hash %q: %d bytes is more than the %d-byte key: %w", spec, v, keyBytes, ErrInvalidArgument)
		}
		n = v
	}
	key := make([]byte, keyBytes)
	if name == "plain" {
		if len(passphrase) < n {
			return nil, fmt.Errorf("hash plain: the passphrase is %d bytes, the key needs %d: %w", len(passphrase), n, ErrInvalidArgument)
		}
		copy(key, passphrase[:n])
		return key, nil
	}
	newHash, ok := plainHashes[name]
	if !ok {
		return nil, fmt.Errorf("hash %q is not one dmconvert can compute for plain mode (it can: plain, ripemd160, sha1, sha224, sha256, sha384, sha512): %w", name, ErrInvalidArgument)
	}
	h := newHash()
	var sum []byte
	for round, done := 0, 0; done < n; round++ {
		h.Reset()
		for range round {
			h.Write([]byte{'A'})
		}
		h.Write(passphrase)
		sum = h.Sum(sum[:0])
		done += copy(key[done:n], sum)
	}
	wipe(sum)
	return key, nil
}
