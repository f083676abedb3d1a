package luks

// TrueCrypt / VeraCrypt volume headers (normal volumes, AES-256-XTS only).
//
// A header sector is 512 bytes: a 64-byte salt, then 448 bytes encrypted
// with the header key. The header key is PBKDF2(prf, passphrase, salt,
// iterations); for AES-XTS its first 32 bytes are the AES key and the
// next 32 the XTS tweak key, and the 448 bytes are one XTS data unit with
// unit number 0. The decrypted part (offsets from byte 64, big-endian):
//
//	  0  4  magic "TRUE" or "VERA"
//	  4  2  header format version
//	  6  2  minimum program version
//	  8  4  CRC32 of the key area (bytes 192..447)
//	 12 16  reserved (TrueCrypt: volume and header creation times)
//	 28  8  hidden volume size
//	 36  8  volume size
//	 44  8  master key scope offset (where the data starts)
//	 52  8  master key scope size
//	 60  4  flags (bit 0: system encryption)
//	 64  4  sector size (version >= 5; 0 or older versions: 512)
//	 68 120 reserved
//	188  4  CRC32 of bytes 0..187 (version >= 4)
//	192 256 key area
//
// For AES-XTS the dm-crypt key of aes-xts-plain64 is key area bytes
// [0:32] (the data key) followed by [32:64] (the tweak key), the way
// cryptsetup's TCRYPT_copy_key builds it (lib/tcrypt/tcrypt.c).

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"fmt"
	"hash"
	"hash/crc32"

	"golang.org/x/crypto/ripemd160" //nolint:staticcheck // TrueCrypt's and VeraCrypt's PBKDF2 PRF
	"golang.org/x/crypto/twofish"   //nolint:staticcheck // a TrueCrypt/VeraCrypt cipher
	"golang.org/x/crypto/xts"
)

// TCryptHeader is a decrypted TrueCrypt or VeraCrypt volume header.
type TCryptHeader struct {
	VeraCrypt  bool   // magic "VERA" (else "TRUE")
	Version    uint16 // header format version
	PRF        string // "sha512", "sha256", "ripemd160", "whirlpool"
	Iterations int
	Cipher     string // cryptsetup's name of the data cipher: "aes-xts-plain64", "serpent-xts-plain64", "twofish-xts-plain64"
	VolumeSize int64  // bytes (the header's volume size field)
	DataOffset int64  // bytes: master key scope offset (where the data starts on the device)
	DataSize   int64  // bytes: master key scope size
	SectorSize int    // 512 unless the header says otherwise (version >= 5 has a sector size field)
	HiddenSize int64  // hidden volume size field (non-zero: the header of an outer volume that holds a hidden one)
	Flags      uint32
	Key        []byte // the data key: 64 bytes for a 256-bit XTS cipher (the caller wipes it)
}

// TCryptParams describe a header CreateTCrypt makes (tests, and tools that need one).
type TCryptParams struct {
	VeraCrypt  bool
	PRF        string   // as above
	Iterations int      // 0: the format's default for PRF
	Cipher     string   // "" or "aes-xts-plain64": AES-256-XTS; "serpent-xts-plain64", "twofish-xts-plain64"
	Key        []byte   // 64-byte XTS data key
	DataOffset int64    // bytes, default 131072
	DataSize   int64    // bytes
	VolumeSize int64    // bytes (usually DataSize)
	Salt       []byte   // 64 bytes; nil: random
	Keyfiles   [][]byte // contents of the keyfiles, in order (TCryptOpen)
}

const (
	tcryptSectorLen   = 512 // salt + encrypted header
	tcryptSaltLen     = 64
	tcryptEncLen      = 448 // encrypted part
	tcryptKeyAreaOff  = 192 // key area, from the start of the encrypted part
	tcryptKeyAreaLen  = 256
	tcryptHdrCRCLen   = 188    // bytes covered by the header CRC32
	tcryptHeaderKey   = 64     // AES-256-XTS header key (AES key + tweak key)
	tcryptDataKeyLen  = 64     // AES-256-XTS data key
	tcryptFlagSystem  = 1 << 0 // system encryption (header outside the partition)
	tcryptMaxPassTC   = 64     // TrueCrypt's (and cryptsetup's) passphrase limit
	tcryptMaxPassVC   = 128    // VeraCrypt's limit (cryptsetup: VeraCrypt modes only)
	tcryptDefaultData = 131072 // TrueCrypt 7 / VeraCrypt: 64 KiB header + 64 KiB hidden header area

	tcryptVersion     = 5
	tcryptMinProgTC   = 0x0700 // TrueCrypt 7.0 (tcplay writes the same)
	tcryptMinProgVC   = 0x010b // VeraCrypt 1.11 (tcplay writes the same)
	tcryptMagicTC     = "TRUE"
	tcryptMagicVC     = "VERA"
	tcryptMinVersion  = 3 // first version with XTS (TrueCrypt 5); 1 and 2 used LRW/CBC
	tcryptMaxVersion  = 5
	tcryptHdrCRCSince = 4 // header CRC32 present from version 4 (as cryptsetup checks)
)

// tcryptKDF is one PBKDF2 variant OpenTCrypt tries.
type tcryptKDF struct {
	veraCrypt  bool // a VeraCrypt variant (a longer passphrase is possible)
	prf        string
	iterations int
}

// tcryptKDFs are the PBKDF2 variants of normal (non-system) volumes, in
// cryptsetup's order (lib/tcrypt/tcrypt.c tcrypt_kdf[], without the PRFs
// this package does not implement: sha1 (legacy), blake2s, stribog,
// argon2id, and without the boot-only VeraCrypt counts). The VeraCrypt
// counts are those without a PIM.
var tcryptKDFs = []tcryptKDF{
	{false, "ripemd160", 2000},
	{false, "ripemd160", 1000}, // TrueCrypt system encryption; cryptsetup tries it for every volume
	{false, "sha512", 1000},
	{false, "whirlpool", 1000},
	{true, "sha512", 500000},
	{true, "whirlpool", 500000},
	{true, "sha256", 500000},
	{true, "ripemd160", 655331},
}

func tcryptPRF(name string) func() hash.Hash {
	switch name {
	case "sha512":
		return sha512.New
	case "sha256":
		return sha256.New
	case "ripemd160":
		return ripemd160.New
	case "whirlpool":
		return newWhirlpool
	}
	return nil
}

// tcryptDefaultIterations is the iteration count the format uses for prf
// (0: the format does not use prf).
func tcryptDefaultIterations(veraCrypt bool, prf string) int {
	for _, k := range tcryptKDFs {
		if k.veraCrypt == veraCrypt && k.prf == prf {
			return k.iterations // the first one: the normal-volume count
		}
	}
	return 0
}

// tcryptCipher is a (non-cascaded) cipher of TrueCrypt and VeraCrypt
// volumes: the header and the data use it in XTS mode with 256-bit keys,
// the header key and the data key being the primary key then the tweak
// key (32 bytes each), as cryptsetup reads them for one cipher.
type tcryptCipher struct {
	name  string // cryptsetup's data cipher
	block func([]byte) (cipher.Block, error)
}

// tcryptCiphers are tried, in cryptsetup's order, for every KDF variant.
var tcryptCiphers = []tcryptCipher{
	{"aes-xts-plain64", aes.NewCipher},
	{"serpent-xts-plain64", newSerpent},
	{"twofish-xts-plain64", func(k []byte) (cipher.Block, error) { return twofish.NewCipher(k) }},
}

func tcryptCipherNamed(name string) (tcryptCipher, bool) {
	if name == "" {
		return tcryptCiphers[0], true
	}
	for _, c := range tcryptCiphers {
		if c.name == name {
			return c, true
		}
	}
	return tcryptCipher{}, false
}

// xts makes the XTS cipher of a 64-byte header key.
func (tc tcryptCipher) xts(key []byte) (*xts.Cipher, error) {
	c, err := xts.NewCipher(tc.block, key)
	if err != nil {
		return nil, fmt.Errorf("tcrypt: header cipher %s: %v: %w", tc.name, err, ErrInvalidArgument)
	}
	return c, nil
}

// OpenTCrypt decrypts the first 512 bytes of a TrueCrypt/VeraCrypt volume
// (hdr: at least 512 bytes; salt = first 64 bytes, then 448 encrypted bytes)
// with passphrase, trying the PRFs and iteration counts TrueCrypt and
// VeraCrypt use (TrueCrypt: ripemd160 2000 and 1000, sha512 1000;
// VeraCrypt without PIM: sha512 500000, sha256 500000, ripemd160 655331),
// header cipher AES-256-XTS only. It returns an error wrapping
// ErrWrongPassphrase when nothing decrypts to a valid header (magic and
// both CRC32s), ErrUnsupported for a header that decrypts but uses
// something this package does not handle (system encryption, an unknown
// version or sector size).
func OpenTCrypt(hdr, passphrase []byte) (*TCryptHeader, error) {
	return openTCrypt(hdr, passphrase, nil, tcryptKDFs)
}

// TCryptPIMIterations is the PBKDF2 iteration count of a VeraCrypt normal
// volume made with a PIM (VeraCrypt's rule, as cryptsetup applies it for
// --veracrypt-pim: 15000 + 1000 x PIM, whatever the PRF).
func TCryptPIMIterations(pim int) int { return 15000 + 1000*pim }

// MaxTCryptPIM bounds a PIM (VeraCrypt accepts larger ones; beyond this
// one derivation takes minutes).
const MaxTCryptPIM = 1 << 20

// OpenTCryptPIM is OpenTCrypt for a volume whose VeraCrypt header was
// made with a PIM: only the VeraCrypt variants are tried (TrueCrypt has no
// PIM), with TCryptPIMIterations(pim), as cryptsetup --veracrypt-pim does.
func OpenTCryptPIM(hdr, passphrase []byte, pim int) (*TCryptHeader, error) {
	if pim <= 0 {
		return nil, fmt.Errorf("tcrypt: PIM %d is not between 1 and %d: %w", pim, MaxTCryptPIM, ErrInvalidArgument)
	}
	return OpenTCryptWith(hdr, passphrase, TCryptOpen{PIM: pim})
}

// TCryptOpen are the optional inputs of OpenTCryptWith.
type TCryptOpen struct {
	// PIM: a VeraCrypt volume's PIM (0: none).
	PIM int
	// Keyfiles: the contents of the volume's keyfiles, in order (as
	// cryptsetup reads them: at most the first TCryptKeyfileMax bytes of
	// each count).
	Keyfiles [][]byte
	// PRF and Iterations, when set, restrict the derivations to that one
	// variant (a header's, as a first open found them).
	PRF        string
	Iterations int
}

// TCryptKeyfileMax is how much of a keyfile counts (TrueCrypt's 1 MiB).
const TCryptKeyfileMax = 1 << 20

// OpenTCryptWith is OpenTCrypt with a PIM, keyfiles, or one variant.
func OpenTCryptWith(hdr, passphrase []byte, o TCryptOpen) (*TCryptHeader, error) {
	if o.PIM < 0 || o.PIM > MaxTCryptPIM {
		return nil, fmt.Errorf("tcrypt: PIM %d is not between 1 and %d: %w", o.PIM, MaxTCryptPIM, ErrInvalidArgument)
	}
	var kdfs []tcryptKDF
	for _, k := range tcryptKDFs {
		if o.PIM > 0 {
			if !k.veraCrypt {
				continue
			}
			k.iterations = TCryptPIMIterations(o.PIM)
		}
		if o.PRF != "" && (k.prf != o.PRF || k.iterations != o.Iterations) {
			continue
		}
		kdfs = append(kdfs, k)
	}
	if pim := (o.Iterations - 15000) / 1000; len(kdfs) == 0 && o.PRF != "" && o.Iterations > 15000 && TCryptPIMIterations(pim) == o.Iterations && pim <= MaxTCryptPIM && tcryptPRF(o.PRF) != nil {
		// A VeraCrypt header made with a PIM.
		kdfs = append(kdfs, tcryptKDF{veraCrypt: true, prf: o.PRF, iterations: o.Iterations})
	}
	if len(kdfs) == 0 {
		return nil, fmt.Errorf("tcrypt: PBKDF2 %s with %d iterations is not a TrueCrypt or VeraCrypt variant this package opens: %w", o.PRF, o.Iterations, ErrUnsupported)
	}
	return openTCrypt(hdr, passphrase, o.Keyfiles, kdfs)
}

// tcryptPool is the KDF's input with keyfiles, as TrueCrypt (and
// cryptsetup) make it: a pool of n bytes (64; a VeraCrypt variant with a
// passphrase longer than 64 bytes: 128) to which every keyfile adds, byte
// by byte, the 4 bytes (big-endian) of its running CRC-32 (not inverted,
// from all ones), wrapping around the pool; then the passphrase's bytes
// are added to the pool's first ones. The whole pool is the input.
func tcryptPool(passphrase []byte, keyfiles [][]byte, n int) []byte {
	pool := make([]byte, n)
	for _, kf := range keyfiles {
		kf = kf[:min(len(kf), TCryptKeyfileMax)]
		crc, j := ^uint32(0), 0
		for i := range kf {
			crc = ^crc32.Update(^crc, crc32.IEEETable, kf[i:i+1])
			pool[j] += byte(crc >> 24)
			pool[j+1] += byte(crc >> 16)
			pool[j+2] += byte(crc >> 8)
			pool[j+3] += byte(crc)
			j = (j + 4) % n
		}
	}
	for i, b := range passphrase {
		pool[i] += b
	}
	return pool
}

// OpenTCryptKDF is OpenTCrypt trying only the PBKDF2 variant prf with
// iterations (a header's PRF and Iterations, as OpenTCrypt found them):
// one derivation instead of up to six, the slowest of which take seconds.
func OpenTCryptKDF(hdr, passphrase []byte, prf string, iterations int) (*TCryptHeader, error) {
	return OpenTCryptWith(hdr, passphrase, TCryptOpen{PRF: prf, Iterations: iterations})
}

func openTCrypt(hdr, passphrase []byte, keyfiles [][]byte, kdfs []tcryptKDF) (*TCryptHeader, error) {
	if len(hdr) < tcryptSectorLen {
		return nil, fmt.Errorf("tcrypt: header is %d bytes, need %d: %w", len(hdr), tcryptSectorLen, ErrInvalidArgument)
	}
	if len(passphrase) > tcryptMaxPassVC {
		return nil, fmt.Errorf("tcrypt: passphrase is %d bytes, VeraCrypt allows at most %d: %w", len(passphrase), tcryptMaxPassVC, ErrInvalidArgument)
	}
	salt := hdr[:tcryptSaltLen]
	enc := hdr[tcryptSaltLen:tcryptSectorLen]
	dec := make([]byte, tcryptEncLen)
	defer clear(dec)
	for _, k := range kdfs {
		if !k.veraCrypt && len(passphrase) > tcryptMaxPassTC {
			continue // TrueCrypt cannot have made it
		}
		in := passphrase
		if len(keyfiles) > 0 {
			n := tcryptMaxPassTC
			if k.veraCrypt && len(passphrase) > tcryptMaxPassTC {
				n = tcryptMaxPassVC
			}
			in = tcryptPool(passphrase, keyfiles, n)
		}
		hk := pbkdf2Key(in, salt, k.iterations, tcryptHeaderKey, tcryptPRF(k.prf))
		if len(keyfiles) > 0 {
			clear(in)
		}
		for _, tc := range tcryptCiphers {
			c, err := tc.xts(hk)
			if err != nil {
				clear(hk)
				return nil, err
			}
			c.Decrypt(dec, enc, 0)
			if tcryptValid(dec) {
				clear(hk)
				return tcryptParse(dec, k, tc.name)
			}
		}
		clear(hk)
	}
	return nil, fmt.Errorf("tcrypt: no TrueCrypt or VeraCrypt header decrypts with this passphrase "+
		"(tried PBKDF2 sha512, sha256, ripemd160, whirlpool with AES-, Serpent- and Twofish-XTS; "+
		"cascades, other ciphers and PRFs are not supported; a VeraCrypt PIM and keyfiles must be given): %w", ErrWrongPassphrase)
}

// tcryptValid reports whether a decrypted header has a magic and
// matching CRC32s (the header CRC from version 4 on, as cryptsetup).
func tcryptValid(dec []byte) bool {
	m := string(dec[:4])
	if m != tcryptMagicTC && m != tcryptMagicVC {
		return false
	}
	keyArea := dec[tcryptKeyAreaOff : tcryptKeyAreaOff+tcryptKeyAreaLen]
	if crc32.ChecksumIEEE(keyArea) != binary.BigEndian.Uint32(dec[8:]) {
		return false
	}
	if binary.BigEndian.Uint16(dec[4:]) >= tcryptHdrCRCSince &&
		crc32.ChecksumIEEE(dec[:tcryptHdrCRCLen]) != binary.BigEndian.Uint32(dec[tcryptHdrCRCLen:]) {
		return false
	}
	return true
}

func tcryptParse(dec []byte, k tcryptKDF, cipherName string) (*TCryptHeader, error) {
	be := binary.BigEndian
	h := &TCryptHeader{
		VeraCrypt:  string(dec[:4]) == tcryptMagicVC,
		Version:    be.Uint16(dec[4:]),
		PRF:        k.prf,
		Iterations: k.iterations,
		Cipher:     cipherName,
		Flags:      be.Uint32(dec[60:]),
		SectorSize: 512,
	}
	if h.Version < tcryptMinVersion || h.Version > tcryptMaxVersion {
		return nil, fmt.Errorf("tcrypt: header version %d (supported: %d to %d): %w", h.Version, tcryptMinVersion, tcryptMaxVersion, ErrUnsupported)
	}
	if h.Flags&tcryptFlagSystem != 0 {
		return nil, fmt.Errorf("tcrypt: system encryption header (flags %#x): %w", h.Flags, ErrUnsupported)
	}
	if h.Version >= 5 {
		if s := be.Uint32(dec[64:]); s != 0 {
			if s != 512 && s != 1024 && s != 2048 && s != 4096 {
				return nil, fmt.Errorf("tcrypt: sector size %d: %w", s, ErrUnsupported)
			}
			h.SectorSize = int(s)
		}
	}
	fields := []struct {
		name string
		off  int
		dst  *int64
	}{
		{"hidden volume size", 28, &h.HiddenSize},
		{"volume size", 36, &h.VolumeSize},
		{"data offset", 44, &h.DataOffset},
		{"data size", 52, &h.DataSize},
	}
	for _, f := range fields {
		v := be.Uint64(dec[f.off:])
		if v > 1<<62 {
			return nil, fmt.Errorf("tcrypt: %s %d is out of range: %w", f.name, v, ErrCorrupt)
		}
		*f.dst = int64(v)
	}
	if h.DataOffset == 0 {
		h.DataOffset = 512 // cryptsetup's reading of a zero offset
	}
	if h.DataOffset%512 != 0 || h.DataSize%512 != 0 {
		return nil, fmt.Errorf("tcrypt: data offset %d or size %d is not a multiple of 512 bytes: %w", h.DataOffset, h.DataSize, ErrUnsupported)
	}
	h.Key = make([]byte, tcryptDataKeyLen)
	copy(h.Key, dec[tcryptKeyAreaOff:tcryptKeyAreaOff+tcryptDataKeyLen])
	return h, nil
}

// CreateTCrypt returns the 512-byte header sector (salt + encrypted header) for p.
// The header is version 5 with sector size 512, minimum program version
// 0x0700 (TrueCrypt) or 0x010b (VeraCrypt) as tcplay writes them; the key
// area after the 64-byte data key is random, as TrueCrypt fills it.
func CreateTCrypt(p TCryptParams, passphrase []byte) ([]byte, error) {
	prf := tcryptPRF(p.PRF)
	if prf == nil {
		return nil, fmt.Errorf("tcrypt: PRF %q (supported: sha512, sha256, ripemd160, whirlpool): %w", p.PRF, ErrInvalidArgument)
	}
	iter := p.Iterations
	if iter == 0 {
		iter = tcryptDefaultIterations(p.VeraCrypt, p.PRF)
		if iter == 0 {
			return nil, fmt.Errorf("tcrypt: TrueCrypt does not use PRF %q (VeraCrypt does): %w", p.PRF, ErrInvalidArgument)
		}
	} else if iter < 0 {
		return nil, fmt.Errorf("tcrypt: %d iterations: %w", iter, ErrInvalidArgument)
	}
	maxPass := tcryptMaxPassTC
	if p.VeraCrypt {
		maxPass = tcryptMaxPassVC
	}
	if len(passphrase) > maxPass {
		return nil, fmt.Errorf("tcrypt: passphrase is %d bytes, the format allows at most %d: %w", len(passphrase), maxPass, ErrInvalidArgument)
	}
	if len(p.Key) != tcryptDataKeyLen {
		return nil, fmt.Errorf("tcrypt: data key is %d bytes, AES-256-XTS needs %d: %w", len(p.Key), tcryptDataKeyLen, ErrInvalidArgument)
	}
	off := p.DataOffset
	if off == 0 {
		off = tcryptDefaultData
	}
	vol := p.VolumeSize
	if vol == 0 {
		vol = p.DataSize
	}
	if off < 512 || off%512 != 0 || p.DataSize <= 0 || p.DataSize%512 != 0 || vol < 0 {
		return nil, fmt.Errorf("tcrypt: data offset %d, size %d, volume size %d: offset and size must be positive multiples of 512 bytes: %w",
			off, p.DataSize, vol, ErrInvalidArgument)
	}
	out := make([]byte, tcryptSectorLen)
	switch {
	case p.Salt == nil:
		if _, err := rand.Read(out[:tcryptSaltLen]); err != nil {
			return nil, fmt.Errorf("tcrypt: salt: %w", err)
		}
	case len(p.Salt) == tcryptSaltLen:
		copy(out, p.Salt)
	default:
		return nil, fmt.Errorf("tcrypt: salt is %d bytes, need %d: %w", len(p.Salt), tcryptSaltLen, ErrInvalidArgument)
	}

	dec := make([]byte, tcryptEncLen)
	defer clear(dec)
	be := binary.BigEndian
	magic, minProg := tcryptMagicTC, uint16(tcryptMinProgTC)
	if p.VeraCrypt {
		magic, minProg = tcryptMagicVC, tcryptMinProgVC
	}
	copy(dec, magic)
	be.PutUint16(dec[4:], tcryptVersion)
	be.PutUint16(dec[6:], minProg)
	be.PutUint64(dec[36:], uint64(vol))
	be.PutUint64(dec[44:], uint64(off))
	be.PutUint64(dec[52:], uint64(p.DataSize))
	be.PutUint32(dec[64:], 512)
	keyArea := dec[tcryptKeyAreaOff : tcryptKeyAreaOff+tcryptKeyAreaLen]
	copy(keyArea, p.Key)
	if _, err := rand.Read(keyArea[tcryptDataKeyLen:]); err != nil {
		return nil, fmt.Errorf("tcrypt: key area: %w", err)
	}
	be.PutUint32(dec[8:], crc32.ChecksumIEEE(keyArea))
	be.PutUint32(dec[tcryptHdrCRCLen:], crc32.ChecksumIEEE(dec[:tcryptHdrCRCLen]))

	in := passphrase
	if len(p.Keyfiles) > 0 {
		n := tcryptMaxPassTC
		if p.VeraCrypt && len(passphrase) > tcryptMaxPassTC {
			n = tcryptMaxPassVC
		}
		in = tcryptPool(passphrase, p.Keyfiles, n)
		defer clear(in)
	}
	tc, ok := tcryptCipherNamed(p.Cipher)
	if !ok {
		return nil, fmt.Errorf("tcrypt: cipher %q: %w", p.Cipher, ErrInvalidArgument)
	}
	hk := pbkdf2Key(in, out[:tcryptSaltLen], iter, tcryptHeaderKey, prf)
	c, err := tc.xts(hk)
	clear(hk)
	if err != nil {
		return nil, err
	}
	c.Encrypt(out[tcryptSaltLen:], dec, 0)
	return out, nil
}
