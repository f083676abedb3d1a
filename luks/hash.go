package luks

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"hash"
	"strings"
)

// hashByName maps cryptsetup hash names (as stored in LUKS1 hashSpec and
// LUKS2 "hash" fields) to Go constructors. Names are compared lower-case,
// as cryptsetup lower-cases LUKS1 hash specs.
func hashByName(name string) (func() hash.Hash, error) {
	switch strings.ToLower(name) {
	case "sha1":
		return sha1.New, nil
	case "sha224":
		return sha256.New224, nil
	case "sha256":
		return sha256.New, nil
	case "sha384":
		return sha512.New384, nil
	case "sha512":
		return sha512.New, nil
	}
	return nil, fmt.Errorf("hash %q: %w", name, ErrUnsupported)
}

// SupportedHashes lists the hash names accepted for PBKDF2, the AF
// splitter and the key digest.
func SupportedHashes() []string {
	return []string{"sha1", "sha224", "sha256", "sha384", "sha512"}
}
