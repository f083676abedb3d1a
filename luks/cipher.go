package luks

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/twofish" //nolint:staticcheck // LUKS volumes use it
	"golang.org/x/crypto/xts"
)

// Cipher specifications in dm-crypt/cryptsetup form "cipher-mode-iv".
//
// Keyslot material is encrypted with the same cipher as the data segment
// (this is what cryptsetup does for every cipher below: LUKS1 always uses
// the header cipher, LUKS2 uses the segment cipher whenever its crypto
// backend can run it in user space, which holds for all of these), in
// 512-byte sectors numbered from 0 at the start of the keyslot area.
//
// Supported (cipher spec: valid volume key sizes in bytes):
//
//	aes-xts-plain64       32, 64   (default, 64 = AES-256-XTS)
//	aes-xts-plain         32, 64
//	aes-cbc-essiv:sha256  16, 24, 32
//	aes-cbc-plain64       16, 24, 32
//	aes-cbc-plain         16, 24, 32
//
// and the same modes with serpent or twofish in place of aes (Serpent is
// this package's own, serpent.go; Twofish is golang.org/x/crypto's): a
// LUKS volume cryptsetup made with them has its keyslots encrypted with
// them too, when the kernel runs them (cryptsetup's backend uses AF_ALG).
// Keyslots this package creates for a LUKS2 segment of those ciphers use
// the AES fallback below, which every cryptsetup opens; LUKS1 keyslots
// have no choice (the data's cipher).
//
// "plain64" is the 64-bit little-endian sector number as IV, "plain" its
// low 32 bits, "essiv:sha256" encrypts the plain64 IV with the same block
// cipher keyed by SHA-256 of the volume key (the kernel's essiv template).
// The other primitives come from crypto/aes, crypto/cipher and
// golang.org/x/crypto/xts.
const DefaultCipher = "aes-xts-plain64"

// SupportedCiphers lists the cipher specs this package can create and
// whose keyslots it can open.
func SupportedCiphers() []string {
	var out []string
	for _, name := range []string{"aes", "serpent", "twofish"} {
		for _, mode := range []string{"xts-plain64", "xts-plain", "cbc-essiv:sha256", "cbc-plain64", "cbc-plain"} {
			out = append(out, name+"-"+mode)
		}
	}
	return out
}

// blockCiphers are the block ciphers of the supported specs.
var blockCiphers = map[string]func(key []byte) (cipher.Block, error){
	"aes":     aes.NewCipher,
	"serpent": newSerpent,
	"twofish": func(key []byte) (cipher.Block, error) { return twofish.NewCipher(key) },
}

type cipherSpec struct {
	name string // "aes"
	mode string // "xts-plain64" (LUKS1 cipherMode)
	xts  bool
	iv   string // "plain64", "plain", "essiv:sha256"
}

func (c cipherSpec) String() string { return c.name + "-" + c.mode }

// parseCipher splits and validates a cipher spec.
func parseCipher(spec string) (cipherSpec, error) {
	name, mode, ok := strings.Cut(spec, "-")
	if !ok {
		return cipherSpec{}, fmt.Errorf("cipher %q is not in cipher-mode-iv form: %w", spec, ErrInvalidArgument)
	}
	return parseCipherNameMode(name, mode)
}

func parseCipherNameMode(name, mode string) (cipherSpec, error) {
	c := cipherSpec{name: name, mode: mode}
	if blockCiphers[name] == nil {
		return c, fmt.Errorf("cipher %q: %w (supported: aes, serpent and twofish in xts-plain64, xts-plain, cbc-essiv:sha256, cbc-plain64 or cbc-plain)", c, ErrUnsupported)
	}
	chain, iv, _ := strings.Cut(mode, "-")
	switch chain {
	case "xts":
		c.xts = true
	case "cbc":
	default:
		return c, fmt.Errorf("cipher %q: %w (supported: %s)", c, ErrUnsupported, strings.Join(SupportedCiphers(), ", "))
	}
	switch iv {
	case "plain64", "plain":
	case "essiv:sha256":
		if c.xts {
			return c, fmt.Errorf("cipher %q: %w", c, ErrUnsupported)
		}
	default:
		return c, fmt.Errorf("cipher %q: %w (supported: %s)", c, ErrUnsupported, strings.Join(SupportedCiphers(), ", "))
	}
	c.iv = iv
	return c, nil
}

// checkKeySize reports whether n bytes is a valid key for the cipher.
func (c cipherSpec) checkKeySize(n int) error {
	ok := false
	if c.xts {
		ok = n == 32 || n == 64
	} else {
		ok = n == 16 || n == 24 || n == 32
	}
	if !ok {
		return fmt.Errorf("%d-bit key for cipher %s: %w", n*8, c, ErrInvalidArgument)
	}
	return nil
}

// sectorCrypter encrypts/decrypts whole 512-byte sectors in place.
type sectorCrypter struct {
	xts   *xts.Cipher
	cbc   cipher.Block
	essiv cipher.Block
	plain bool // 32-bit IV
}

func newSectorCrypter(c cipherSpec, key []byte) (*sectorCrypter, error) {
	if err := c.checkKeySize(len(key)); err != nil {
		return nil, err
	}
	s := &sectorCrypter{plain: c.iv == "plain"}
	newBlock := blockCiphers[c.name]
	if c.xts {
		x, err := xts.NewCipher(newBlock, key)
		if err != nil {
			return nil, fmt.Errorf("cipher %s: %w", c, err)
		}
		s.xts = x
		return s, nil
	}
	b, err := newBlock(key)
	if err != nil {
		return nil, fmt.Errorf("cipher %s: %w", c, err)
	}
	s.cbc = b
	if c.iv == "essiv:sha256" {
		salt := sha256.Sum256(key)
		e, err := newBlock(salt[:])
		wipe(salt[:])
		if err != nil {
			return nil, fmt.Errorf("cipher %s: %w", c, err)
		}
		s.essiv = e
	}
	return s, nil
}

const sectorSize = 512

func (s *sectorCrypter) iv(sector uint64) []byte {
	iv := make([]byte, aes.BlockSize)
	if s.plain {
		binary.LittleEndian.PutUint32(iv, uint32(sector))
	} else {
		binary.LittleEndian.PutUint64(iv, sector)
	}
	if s.essiv != nil {
		s.essiv.Encrypt(iv, iv)
	}
	return iv
}

func (s *sectorCrypter) sectorNum(sector uint64) uint64 {
	if s.plain {
		return uint64(uint32(sector))
	}
	return sector
}

// encrypt encrypts buf (a multiple of 512 bytes) in place; the first
// sector has IV sector number 0.
func (s *sectorCrypter) encrypt(buf []byte) {
	for i := 0; i+sectorSize <= len(buf); i += sectorSize {
		sec := buf[i : i+sectorSize]
		n := uint64(i / sectorSize)
		if s.xts != nil {
			s.xts.Encrypt(sec, sec, s.sectorNum(n))
			continue
		}
		cipher.NewCBCEncrypter(s.cbc, s.iv(n)).CryptBlocks(sec, sec)
	}
}

func (s *sectorCrypter) decrypt(buf []byte) {
	for i := 0; i+sectorSize <= len(buf); i += sectorSize {
		sec := buf[i : i+sectorSize]
		n := uint64(i / sectorSize)
		if s.xts != nil {
			s.xts.Decrypt(sec, sec, s.sectorNum(n))
			continue
		}
		cipher.NewCBCDecrypter(s.cbc, s.iv(n)).CryptBlocks(sec, sec)
	}
}

// ValidateCipher checks a cipher spec and volume key size (bytes) before
// Create, for early command-line errors.
func ValidateCipher(spec string, keySize int) error {
	c, err := parseCipher(spec)
	if err != nil {
		return err
	}
	return c.checkKeySize(keySize)
}

// DefaultKeySize returns cryptsetup's default volume key size in bytes for
// a cipher spec: 64 (AES-256 in XTS, "256 bits, doubled for XTS") or 32.
func DefaultKeySize(spec string) int {
	if c, err := parseCipher(spec); err == nil && c.xts {
		return 64
	}
	return 32
}

// Keyslot area encryption for keys of segments whose cipher this package
// cannot run. cryptsetup (crypt_keyslot_get_encryption) falls back to the
// same when its crypto backend cannot run the segment cipher.
const (
	FallbackKeyslotCipher  = "aes-xts-plain64"
	FallbackKeyslotKeySize = 64
)

// KeyslotEncryption returns the keyslot area encryption (cipher spec and
// key size in bytes) for a keyslot holding the volume key of a segment
// encrypted with segmentCipher and a keySize-byte key, chosen as
// cryptsetup's crypt_keyslot_get_encryption does: the segment's cipher
// and key size when this package can run them, else aes-xts-plain64 with
// a 512-bit key.
func KeyslotEncryption(segmentCipher string, keySize int) (string, int) {
	// Only AES: cryptsetup may lack Serpent and Twofish (its backend
	// needs the kernel's AF_ALG for them), and then could not open the
	// keyslot.
	if c, err := parseCipher(segmentCipher); err == nil && c.name == "aes" && c.checkKeySize(keySize) == nil {
		return c.String(), keySize
	}
	return FallbackKeyslotCipher, FallbackKeyslotKeySize
}

// CheckSegmentCipher checks a data segment's cipher spec and volume key
// size (bytes) as far as this package can: a cipher it supports (see
// SupportedCiphers) must have a key size it takes; any other one must
// have the cipher-chainmode-ivmode[:ivopts] form with plain names (the
// kernel's dm-crypt decides whether it exists, when a mapping is loaded).
func CheckSegmentCipher(spec string, keySize int) error {
	if keySize <= 0 || keySize > MaxVolumeKeySize {
		return fmt.Errorf("volume key size %d bytes: %w", keySize, ErrInvalidArgument)
	}
	if c, err := parseCipher(spec); err == nil {
		return c.checkKeySize(keySize)
	}
	return CheckCipherForm(spec)
}

// CheckCipherForm checks that spec is a cipher this package supports or
// has the cipher-chainmode-ivmode[:ivopts] form with plain names
// (lower-case letters, digits, '_'), whatever its key size.
func CheckCipherForm(spec string) error {
	_, err := parseCipher(spec)
	if err == nil {
		return nil
	}
	if !errors.Is(err, ErrUnsupported) {
		return err
	}
	name, mode, _ := strings.Cut(spec, "-")
	chain, iv, ok := strings.Cut(mode, "-")
	ivMode, ivOpts, hasOpts := strings.Cut(iv, ":")
	if !ok || name == "" || chain == "" || ivMode == "" || (hasOpts && ivOpts == "") || strings.Contains(iv, "-") {
		return fmt.Errorf("cipher %q is not in cipher-chainmode-ivmode[:ivopts] form: %w", spec, ErrInvalidArgument)
	}
	for _, r := range spec {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == ':' || r == '_') {
			return fmt.Errorf("cipher %q: character %q: %w", spec, r, ErrInvalidArgument)
		}
	}
	return nil
}

// KeySizes returns the volume key sizes (bytes) a cipher this package
// supports takes; for any other cipher it fails with ErrUnsupported (or
// ErrInvalidArgument when spec is not in cipher-mode-iv form).
func KeySizes(spec string) ([]int, error) {
	c, err := parseCipher(spec)
	if err != nil {
		return nil, err
	}
	if c.xts {
		return []int{32, 64}, nil
	}
	return []int{16, 24, 32}, nil
}
