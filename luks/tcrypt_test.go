package luks

import (
	"bufio"
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/twofish" //nolint:staticcheck // a TrueCrypt cipher
	"golang.org/x/crypto/xts"

	"github.com/dmconvert/dmconvert/testvm"
)

// tcryptCase is one header format the tests make.
type tcryptCase struct {
	name string
	vera bool
	prf  string
	iter int // the format's count OpenTCrypt must report
}

var tcryptCases = []tcryptCase{
	{"truecrypt-ripemd160", false, "ripemd160", 2000},
	{"truecrypt-sha512", false, "sha512", 1000},
	{"veracrypt-sha512", true, "sha512", 500000},
	{"veracrypt-sha256", true, "sha256", 500000},
	{"veracrypt-ripemd160", true, "ripemd160", 655331},
	{"truecrypt-whirlpool", false, "whirlpool", 1000},
	{"veracrypt-whirlpool", true, "whirlpool", 500000},
}

// withTCryptKDFs limits OpenTCrypt to the given KDF variants for one
// test (a wrong passphrase otherwise costs every VeraCrypt count, ~5 s).
func withTCryptKDFs(t *testing.T, kdfs ...tcryptKDF) {
	t.Helper()
	old := tcryptKDFs
	tcryptKDFs = kdfs
	t.Cleanup(func() { tcryptKDFs = old })
}

// fastTCrypt is the cheap KDF variant the structural tests use.
var fastTCrypt = tcryptKDF{false, "sha512", 1000}

func newTCrypt(t *testing.T, p TCryptParams, pass []byte) []byte {
	t.Helper()
	sec, err := CreateTCrypt(p, pass)
	if err != nil {
		t.Fatal(err)
	}
	if len(sec) != 512 {
		t.Fatalf("CreateTCrypt returned %d bytes, want 512", len(sec))
	}
	return sec
}

// tcryptDecrypt decrypts a header sector independently of tcrypt.go's
// code paths (its own PBKDF2 call and XTS cipher) for structural checks.
func tcryptDecrypt(t *testing.T, sec, pass []byte, prf string, iter int) (dec []byte, c *xts.Cipher) {
	t.Helper()
	hk := pbkdf2Key(pass, sec[:64], iter, 64, tcryptPRF(prf))
	c, err := xts.NewCipher(aes.NewCipher, hk)
	if err != nil {
		t.Fatal(err)
	}
	dec = make([]byte, 448)
	c.Decrypt(dec, sec[64:512], 0)
	return dec, c
}

// tcryptReseal decrypts sec, lets edit change the plaintext header,
// recomputes both CRC32s and encrypts it again.
func tcryptReseal(t *testing.T, sec, pass []byte, k tcryptKDF, edit func(dec []byte)) []byte {
	t.Helper()
	dec, c := tcryptDecrypt(t, sec, pass, k.prf, k.iterations)
	edit(dec)
	binary.BigEndian.PutUint32(dec[8:], crc32.ChecksumIEEE(dec[192:448]))
	binary.BigEndian.PutUint32(dec[188:], crc32.ChecksumIEEE(dec[:188]))
	out := bytes.Clone(sec)
	c.Encrypt(out[64:512], dec, 0)
	return out
}

func TestTCryptRoundTrip(t *testing.T) {
	pass := []byte("correct horse battery staple")
	for _, tc := range tcryptCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // the default VeraCrypt counts take seconds each
			key := randBytes(t, 64)
			salt := randBytes(t, 64)
			p := TCryptParams{VeraCrypt: tc.vera, PRF: tc.prf, Key: key, DataSize: 3 << 20, VolumeSize: 3 << 20, Salt: salt}
			sec := newTCrypt(t, p, pass)
			if !bytes.Equal(sec[:64], salt) {
				t.Fatal("the salt is not the header's first 64 bytes")
			}

			// The layout, read by the test's own decryption.
			dec, _ := tcryptDecrypt(t, sec, pass, tc.prf, tc.iter)
			be := binary.BigEndian
			wantMagic, wantMin := "TRUE", uint16(0x0700)
			if tc.vera {
				wantMagic, wantMin = "VERA", 0x010b
			}
			if string(dec[:4]) != wantMagic || be.Uint16(dec[4:]) != 5 || be.Uint16(dec[6:]) != wantMin {
				t.Fatalf("magic %q version %d min %#x, want %q 5 %#x", dec[:4], be.Uint16(dec[4:]), be.Uint16(dec[6:]), wantMagic, wantMin)
			}
			if be.Uint64(dec[28:]) != 0 || be.Uint64(dec[36:]) != 3<<20 || be.Uint64(dec[44:]) != 131072 ||
				be.Uint64(dec[52:]) != 3<<20 || be.Uint32(dec[60:]) != 0 || be.Uint32(dec[64:]) != 512 {
				t.Fatalf("fields: hidden %d volume %d offset %d size %d flags %#x sector %d",
					be.Uint64(dec[28:]), be.Uint64(dec[36:]), be.Uint64(dec[44:]), be.Uint64(dec[52:]), be.Uint32(dec[60:]), be.Uint32(dec[64:]))
			}
			if !bytes.Equal(dec[192:256], key) {
				t.Fatal("the key area does not start with the data key")
			}
			if be.Uint32(dec[8:]) != crc32.ChecksumIEEE(dec[192:448]) || be.Uint32(dec[188:]) != crc32.ChecksumIEEE(dec[:188]) {
				t.Fatal("CRC32 fields do not match")
			}
			if !bytes.Equal(dec[12:28], make([]byte, 16)) || !bytes.Equal(dec[68:188], make([]byte, 120)) {
				t.Fatal("reserved bytes are not zero")
			}

			h, err := OpenTCrypt(sec, pass)
			if err != nil {
				t.Fatal(err)
			}
			want := TCryptHeader{VeraCrypt: tc.vera, Version: 5, PRF: tc.prf, Iterations: tc.iter, Cipher: "aes-xts-plain64",
				VolumeSize: 3 << 20, DataOffset: 131072, DataSize: 3 << 20, SectorSize: 512}
			got := *h
			got.Key = nil
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("OpenTCrypt = %+v, want %+v", got, want)
			}
			if !bytes.Equal(h.Key, key) {
				t.Fatalf("key\n got %x\nwant %x", h.Key, key)
			}
		})
	}
}

func TestTCryptRandomSaltAndKeyArea(t *testing.T) {
	withTCryptKDFs(t, fastTCrypt)
	pass := []byte("pw")
	p := TCryptParams{PRF: "sha512", Key: randBytes(t, 64), DataSize: 1 << 20}
	a, b := newTCrypt(t, p, pass), newTCrypt(t, p, pass)
	if bytes.Equal(a[:64], b[:64]) {
		t.Fatal("two headers got the same salt")
	}
	da, _ := tcryptDecrypt(t, a, pass, "sha512", 1000)
	if bytes.Equal(da[256:448], make([]byte, 192)) {
		t.Fatal("the key area after the data key is not filled")
	}
	// A longer input (the caller passing more of the device) is fine.
	h, err := OpenTCrypt(append(bytes.Clone(a), make([]byte, 1024)...), pass)
	if err != nil {
		t.Fatal(err)
	}
	if h.VolumeSize != 1<<20 || h.DataOffset != 131072 {
		t.Fatalf("defaults: volume size %d (want DataSize), data offset %d (want 131072)", h.VolumeSize, h.DataOffset)
	}
}

// TestTCryptWrongPassphrase uses the real KDF list: every variant is
// tried before giving up.
func TestTCryptWrongPassphrase(t *testing.T) {
	sec := newTCrypt(t, TCryptParams{PRF: "sha512", Key: randBytes(t, 64), DataSize: 1 << 20}, []byte("right"))
	start := time.Now()
	_, err := OpenTCrypt(sec, []byte("wrong"))
	if !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("wrong passphrase: %v, want ErrWrongPassphrase", err)
	}
	t.Logf("a wrong passphrase took %v (all KDF variants)", time.Since(start).Round(time.Millisecond))
	if _, err := OpenTCrypt(sec, []byte("right")); err != nil {
		t.Fatal(err)
	}
}

func TestTCryptCorrupt(t *testing.T) {
	withTCryptKDFs(t, fastTCrypt)
	pass := []byte("pass")
	sec := newTCrypt(t, TCryptParams{PRF: "sha512", Key: randBytes(t, 64), DataSize: 1 << 20}, pass)
	if _, err := OpenTCrypt(sec, pass); err != nil {
		t.Fatal(err)
	}
	// A flipped bit anywhere (salt, header fields, CRCs, key area) makes
	// the sector undecryptable.
	for _, off := range []int{0, 63, 64, 64 + 5, 64 + 40, 64 + 188, 64 + 200, 511} {
		bad := bytes.Clone(sec)
		bad[off] ^= 0x01
		if _, err := OpenTCrypt(bad, pass); !errors.Is(err, ErrWrongPassphrase) {
			t.Errorf("byte %d flipped: %v, want ErrWrongPassphrase", off, err)
		}
	}
	// The CRCs are checked on their own: a header with a right magic
	// and one wrong CRC is refused.
	for _, field := range []int{8, 188} {
		bad := tcryptReseal(t, sec, pass, fastTCrypt, func([]byte) {})
		dec, c := tcryptDecrypt(t, bad, pass, "sha512", 1000)
		dec[field] ^= 0xff
		c.Encrypt(bad[64:512], dec, 0)
		if _, err := OpenTCrypt(bad, pass); !errors.Is(err, ErrWrongPassphrase) {
			t.Errorf("CRC at %d wrong: %v, want ErrWrongPassphrase", field, err)
		}
	}
	bad := tcryptReseal(t, sec, pass, fastTCrypt, func(d []byte) { copy(d, "LUKS") })
	if _, err := OpenTCrypt(bad, pass); !errors.Is(err, ErrWrongPassphrase) {
		t.Errorf("bad magic: %v, want ErrWrongPassphrase", err)
	}
	// Nothing at all (zeros) is not a header either.
	if _, err := OpenTCrypt(make([]byte, 512), pass); !errors.Is(err, ErrWrongPassphrase) {
		t.Errorf("zero sector: %v, want ErrWrongPassphrase", err)
	}
	if _, err := OpenTCrypt(sec[:511], pass); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("511-byte header: %v, want ErrInvalidArgument", err)
	}
}

// A Twofish-XTS volume: the header CreateTCrypt makes decrypts with
// Twofish-XTS under the PBKDF2 key (the test's own decryption, not with
// AES), and OpenTCrypt finds the cipher and the key.
func TestTCryptTwofish(t *testing.T) {
	withTCryptKDFs(t, fastTCrypt)
	pass := []byte("twofish passphrase")
	key := randBytes(t, 64)
	sec := newTCrypt(t, TCryptParams{PRF: "sha512", Cipher: "twofish-xts-plain64", Key: key, DataSize: 1 << 20}, pass)
	hk := pbkdf2Key(pass, sec[:64], 1000, 64, tcryptPRF("sha512"))
	c, err := xts.NewCipher(func(k []byte) (cipher.Block, error) { return twofish.NewCipher(k) }, hk)
	if err != nil {
		t.Fatal(err)
	}
	dec := make([]byte, 448)
	c.Decrypt(dec, sec[64:512], 0)
	if string(dec[:4]) != "TRUE" || !bytes.Equal(dec[192:256], key) {
		t.Fatalf("the header does not decrypt with Twofish-XTS: magic %q", dec[:4])
	}
	if d, _ := tcryptDecrypt(t, sec, pass, "sha512", 1000); string(d[:4]) == "TRUE" {
		t.Fatal("the Twofish header decrypts with AES")
	}
	h, err := OpenTCrypt(sec, pass)
	if err != nil {
		t.Fatal(err)
	}
	if h.Cipher != "twofish-xts-plain64" || !bytes.Equal(h.Key, key) {
		t.Fatalf("OpenTCrypt: cipher %s, key equal %v", h.Cipher, bytes.Equal(h.Key, key))
	}
	if _, err := CreateTCrypt(TCryptParams{PRF: "sha512", Cipher: "serpent-cbc-plain", Key: key, DataSize: 1 << 20}, pass); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("an unknown cipher: %v", err)
	}
}

func TestTCryptUnsupported(t *testing.T) {
	withTCryptKDFs(t, fastTCrypt)
	pass := []byte("pass")
	sec := newTCrypt(t, TCryptParams{PRF: "sha512", Key: randBytes(t, 64), DataSize: 1 << 20}, pass)
	be := binary.BigEndian
	for _, tc := range []struct {
		name string
		edit func([]byte)
		want error
	}{
		{"system", func(d []byte) { be.PutUint32(d[60:], 1) }, ErrUnsupported},
		{"sector-size-520", func(d []byte) { be.PutUint32(d[64:], 520) }, ErrUnsupported},
		{"version-6", func(d []byte) { be.PutUint16(d[4:], 6) }, ErrUnsupported},
		{"version-2", func(d []byte) { be.PutUint16(d[4:], 2) }, ErrUnsupported},
		{"odd-offset", func(d []byte) { be.PutUint64(d[44:], 131072+100) }, ErrUnsupported},
		{"huge-size", func(d []byte) { be.PutUint64(d[52:], 1<<63) }, ErrCorrupt},
	} {
		bad := tcryptReseal(t, sec, pass, fastTCrypt, tc.edit)
		if _, err := OpenTCrypt(bad, pass); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}

	// Fields that are valid but not what CreateTCrypt writes.
	ok := tcryptReseal(t, sec, pass, fastTCrypt, func(d []byte) {
		copy(d, "VERA")
		be.PutUint32(d[64:], 4096)
		be.PutUint64(d[28:], 1<<19)
		be.PutUint32(d[60:], 2) // "non-system" flag
	})
	h, err := OpenTCrypt(ok, pass)
	if err != nil {
		t.Fatal(err)
	}
	if !h.VeraCrypt || h.SectorSize != 4096 || h.HiddenSize != 1<<19 || h.Flags != 2 {
		t.Fatalf("got %+v", *h)
	}
	// Version 4: no sector size field (512), a zero offset reads as 512
	// (cryptsetup's rule).
	v4 := tcryptReseal(t, sec, pass, fastTCrypt, func(d []byte) {
		be.PutUint16(d[4:], 4)
		be.PutUint32(d[64:], 4096)
		be.PutUint64(d[44:], 0)
	})
	if h, err = OpenTCrypt(v4, pass); err != nil {
		t.Fatal(err)
	}
	if h.Version != 4 || h.SectorSize != 512 || h.DataOffset != 512 {
		t.Fatalf("version 4: %+v", *h)
	}
	// Version 3 has no header CRC (cryptsetup checks it from version 4).
	v3 := tcryptReseal(t, sec, pass, fastTCrypt, func(d []byte) { be.PutUint16(d[4:], 3) })
	dec, c := tcryptDecrypt(t, v3, pass, "sha512", 1000)
	be.PutUint32(dec[188:], 0)
	c.Encrypt(v3[64:512], dec, 0)
	if h, err = OpenTCrypt(v3, pass); err != nil || h.Version != 3 {
		t.Fatalf("version 3 without header CRC: %v", err)
	}
}

func TestTCryptCreateArguments(t *testing.T) {
	key := randBytes(t, 64)
	for _, tc := range []struct {
		name string
		p    TCryptParams
		pass []byte
	}{
		{"truecrypt-sha256", TCryptParams{PRF: "sha256", Key: key, DataSize: 1 << 20}, nil},
		{"unknown-prf", TCryptParams{VeraCrypt: true, PRF: "stribog512", Key: key, DataSize: 1 << 20}, nil},
		{"short-key", TCryptParams{PRF: "sha512", Key: key[:32], DataSize: 1 << 20}, nil},
		{"no-size", TCryptParams{PRF: "sha512", Key: key}, nil},
		{"odd-size", TCryptParams{PRF: "sha512", Key: key, DataSize: 1000}, nil},
		{"odd-offset", TCryptParams{PRF: "sha512", Key: key, DataSize: 1 << 20, DataOffset: 1000}, nil},
		{"short-salt", TCryptParams{PRF: "sha512", Key: key, DataSize: 1 << 20, Salt: key[:32]}, nil},
		{"truecrypt-65-byte-passphrase", TCryptParams{PRF: "sha512", Key: key, DataSize: 1 << 20}, bytes.Repeat([]byte("a"), 65)},
		{"veracrypt-129-byte-passphrase", TCryptParams{VeraCrypt: true, PRF: "sha512", Key: key, DataSize: 1 << 20, Iterations: 10}, bytes.Repeat([]byte("a"), 129)},
	} {
		if _, err := CreateTCrypt(tc.p, tc.pass); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s: %v, want ErrInvalidArgument", tc.name, err)
		}
	}
	if _, err := OpenTCrypt(make([]byte, 512), bytes.Repeat([]byte("a"), 129)); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("129-byte passphrase: %v, want ErrInvalidArgument", err)
	}
}

// TestTCryptLongVeraCryptPassphrase: VeraCrypt passphrases up to 128
// bytes; TrueCrypt variants are not tried for one over 64.
// TestTCryptKeyfiles: a header made with keyfiles opens with the same
// keyfiles (and the passphrase) in any order (each keyfile adds to the
// pool from its start: TrueCrypt documents that the order does not
// matter), not without them or with some of them; a keyfile counts up to
// 1 MiB only.
func TestTCryptKeyfiles(t *testing.T) {
	pass := []byte("kf passphrase")
	kf1, kf2 := randBytes(t, 3000), randBytes(t, TCryptKeyfileMax+100)
	key := randBytes(t, 64)
	hdr := newTCrypt(t, TCryptParams{PRF: "sha512", Key: key, DataSize: 1 << 20, Keyfiles: [][]byte{kf1, kf2}}, pass)
	h, err := OpenTCryptWith(hdr, pass, TCryptOpen{Keyfiles: [][]byte{kf1, kf2[:TCryptKeyfileMax]}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(h.Key, key) {
		t.Fatal("keyfiles: another key")
	}
	if _, err := OpenTCryptWith(hdr, pass, TCryptOpen{Keyfiles: [][]byte{kf2, kf1}}); err != nil {
		t.Fatalf("the keyfiles in another order: %v", err)
	}
	for name, o := range map[string]TCryptOpen{
		"no keyfiles": {},
		"one of them": {Keyfiles: [][]byte{kf1}},
	} {
		if _, err := OpenTCryptWith(hdr, pass, TCryptOpen{Keyfiles: o.Keyfiles, PRF: "sha512", Iterations: 1000}); !errors.Is(err, ErrWrongPassphrase) {
			t.Fatalf("%s: %v", name, err)
		}
	}
	// The pool: a keyfile of one zero byte adds the 4 bytes of that byte's
	// CRC step (from all ones, not inverted) to the first 4 pool bytes.
	crc := ^crc32.Update(^uint32(0xffffffff), crc32.IEEETable, []byte{0})
	pool := tcryptPool([]byte{1}, [][]byte{{0}}, 64)
	want := []byte{byte(crc>>24) + 1, byte(crc >> 16), byte(crc >> 8), byte(crc)}
	if !bytes.Equal(pool[:4], want) || !bytes.Equal(pool[4:], make([]byte, 60)) {
		t.Fatalf("pool of one zero byte: % x", pool[:8])
	}
}

// TestTCryptPIM: a VeraCrypt header made with a PIM's iteration count
// opens with that PIM (and with its recorded PRF and count), not with
// another PIM.
func TestTCryptPIM(t *testing.T) {
	pass := []byte("pim passphrase")
	key := randBytes(t, 64)
	hdr := newTCrypt(t, TCryptParams{VeraCrypt: true, PRF: "sha256", Iterations: TCryptPIMIterations(2), Key: key, DataSize: 1 << 20}, pass)
	h, err := OpenTCryptPIM(hdr, pass, 2)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(h.Key, key) || h.PRF != "sha256" || h.Iterations != 17000 || !h.VeraCrypt {
		t.Fatalf("OpenTCryptPIM: %+v", h)
	}
	if _, err := OpenTCryptKDF(hdr, pass, h.PRF, h.Iterations); err != nil {
		t.Fatalf("OpenTCryptKDF with the PIM's count: %v", err)
	}
	if _, err := OpenTCryptPIM(hdr, pass, 5); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("another PIM: %v", err)
	}
	if _, err := OpenTCryptPIM(hdr, pass, 0); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("PIM 0: %v", err)
	}
	if _, err := OpenTCryptKDF(hdr, pass, "sha256", 17001); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("a count no variant uses: %v", err)
	}
}

func TestTCryptLongVeraCryptPassphrase(t *testing.T) {
	withTCryptKDFs(t, fastTCrypt, tcryptKDF{true, "sha256", 1000})
	pass := bytes.Repeat([]byte("x"), 100)
	key := randBytes(t, 64)
	sec := newTCrypt(t, TCryptParams{VeraCrypt: true, PRF: "sha256", Iterations: 1000, Key: key, DataSize: 1 << 20}, pass)
	h, err := OpenTCrypt(sec, pass)
	if err != nil {
		t.Fatal(err)
	}
	if !h.VeraCrypt || h.PRF != "sha256" || !bytes.Equal(h.Key, key) {
		t.Fatalf("got %+v", *h)
	}
	// The same passphrase with the TrueCrypt-only variant is skipped.
	tc := newTCrypt(t, TCryptParams{VeraCrypt: true, PRF: "sha512", Iterations: 1000, Key: key, DataSize: 1 << 20}, pass)
	if _, err := OpenTCrypt(tc, pass); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("TrueCrypt KDF with a 100-byte passphrase: %v, want ErrWrongPassphrase", err)
	}
}

// --- Cross-checks with cryptsetup and tcplay (test VM) ---
//
// cryptsetup decrypts TCRYPT headers through the kernel's crypto API
// (AF_ALG, algif_skcipher), which the development host does not have,
// so these run in the guest (DMCONVERT_VM=1 go test ./luks -run TestVM,
// DMCONVERT_VM_RUN=TestGuestTCrypt for just these).

// tcryptDumpFields parses cryptsetup tcryptDump output: "Name:\tvalue"
// lines, and the "MK dump:" hex (continued on tab-indented lines).
func tcryptDumpFields(t *testing.T, out string) (map[string]string, []byte) {
	t.Helper()
	fields := map[string]string{}
	var mk strings.Builder
	inMK := false
	for _, line := range strings.Split(out, "\n") {
		if inMK && strings.HasPrefix(line, "\t") {
			mk.WriteString(line)
			continue
		}
		inMK = false
		name, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		name, val = strings.TrimSpace(name), strings.TrimSpace(val)
		fields[name] = val
		if name == "MK dump" {
			inMK = true
			mk.WriteString(val)
		}
	}
	var key []byte
	if mk.Len() > 0 {
		var err error
		key, err = hex.DecodeString(strings.Join(strings.Fields(mk.String()), ""))
		if err != nil {
			t.Fatalf("MK dump is not hex: %v", err)
		}
	}
	return fields, key
}

// tcryptCheckDump runs cryptsetup tcryptDump (with and without the
// volume key) on dev and checks what it prints against h.
func tcryptCheckDump(t *testing.T, cs cryptsetup, dev string, pass []byte, h *TCryptHeader, extra ...string) {
	t.Helper()
	stdin := append(bytes.Clone(pass), '\n')
	if h.VeraCrypt {
		extra = append(extra, "--veracrypt")
	}
	// Only the header's hash: without it cryptsetup derives with every
	// TrueCrypt and VeraCrypt hash and count before it reaches ours
	// (two VeraCrypt RIPEMD-160 runs of 327661 and 655331 iterations
	// first), tens of seconds of the emulated CPU per call.
	if !slices.Contains(extra, "--hash") {
		extra = append(extra, "--hash", h.PRF)
	}
	out := cs.ok(stdin, append(append([]string{"tcryptDump", "-q"}, extra...), dev)...)
	f, _ := tcryptDumpFields(t, out)
	kind := "TCRYPT header information"
	if h.VeraCrypt {
		kind = "VERACRYPT header information"
	}
	if !strings.Contains(out, kind) {
		t.Errorf("tcryptDump does not say %q:\n%s", kind, out)
	}
	for name, want := range map[string]string{
		"Version":      strconv.Itoa(int(h.Version)),
		"Sector size":  strconv.Itoa(h.SectorSize),
		"MK offset":    strconv.FormatInt(h.DataOffset, 10),
		"PBKDF2 hash":  h.PRF,
		"Cipher chain": strings.SplitN(h.Cipher, "-", 2)[0],
		"Cipher mode":  "xts-plain64",
		"MK bits":      "512",
	} {
		// 2.6 prints bare numbers, later versions add " [bytes]".
		if got := strings.TrimSuffix(f[name], " [bytes]"); got != want {
			t.Errorf("tcryptDump %s = %q, want %q", name, got, want)
		}
	}
	if v, ok := f["Volume size"]; ok && strings.TrimSuffix(v, " [bytes]") != strconv.FormatInt(h.VolumeSize, 10) {
		t.Errorf("tcryptDump Volume size = %q, want %d", v, h.VolumeSize)
	}

	out = cs.ok(stdin, append(append([]string{"tcryptDump", "--dump-volume-key", "-q"}, extra...), dev)...)
	f, key := tcryptDumpFields(t, out)
	if !bytes.Equal(key, h.Key) {
		t.Errorf("cryptsetup's volume key differs\ncryptsetup %x\n      ours %x", key, h.Key)
	}
	if got, want := f["Payload offset"], strconv.FormatInt(h.DataOffset/512, 10); got != want {
		t.Errorf("tcryptDump Payload offset = %q sectors, want %s", got, want)
	}
}

// TestGuestTCryptOursToCryptsetup: cryptsetup opens headers CreateTCrypt
// made and finds our key and layout.
func TestGuestTCryptOursToCryptsetup(t *testing.T) {
	testvm.RequireGuest(t)
	cs := needCryptsetup(t)
	pass := []byte("tcrypt test passphrase")
	const size = 4 << 20
	twofish, serpent := tcryptCases[1], tcryptCases[0]
	twofish.name += "-twofish"
	serpent.name += "-serpent"
	for _, tc := range []tcryptCase{tcryptCases[0], tcryptCases[1], tcryptCases[2], tcryptCases[5], twofish, serpent} {
		t.Run(tc.name, func(t *testing.T) {
			cs := cs.in(t)
			key := randBytes(t, 64)
			p := TCryptParams{VeraCrypt: tc.vera, PRF: tc.prf, Key: key, DataOffset: 131072, DataSize: size - 2*131072, VolumeSize: size - 2*131072}
			switch {
			case strings.HasSuffix(tc.name, "-twofish"):
				p.Cipher = "twofish-xts-plain64"
			case strings.HasSuffix(tc.name, "-serpent"):
				p.Cipher = "serpent-xts-plain64"
			}
			img := make([]byte, size)
			copy(img, newTCrypt(t, p, pass))
			copy(img[131072:], randBytes(t, 1<<20))
			dev := writeTemp(t, "tcrypt.img", img)
			h, err := OpenTCrypt(img, pass)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(h.Key, key) {
				t.Fatal("OpenTCrypt does not return the key CreateTCrypt got")
			}
			tcryptCheckDump(t, cs, dev, pass, h)
			// And cryptsetup refuses a wrong passphrase, as we do.
			// (--hash: without it cryptsetup runs every VeraCrypt KDF,
			// minutes under the VM's emulated CPU).
			args := []string{"tcryptDump", "-q", "--hash", tc.prf}
			if !tc.vera {
				args = append(args, "--disable-veracrypt")
			}
			cs.fails([]byte("not it\n"), append(args, dev)...)
		})
	}
}

// TestGuestTCryptPIMToCryptsetup: cryptsetup --veracrypt-pim opens a
// VeraCrypt header CreateTCrypt made with a PIM's iteration count, and
// finds what OpenTCryptPIM finds.
func TestGuestTCryptPIMToCryptsetup(t *testing.T) {
	testvm.RequireGuest(t)
	cs := needCryptsetup(t)
	pass := []byte("tcrypt pim passphrase")
	const size = 4 << 20
	key := randBytes(t, 64)
	p := TCryptParams{VeraCrypt: true, PRF: "sha512", Iterations: TCryptPIMIterations(3), Key: key, DataOffset: 131072, DataSize: size - 2*131072, VolumeSize: size - 2*131072}
	img := make([]byte, size)
	copy(img, newTCrypt(t, p, pass))
	dev := writeTemp(t, "tcrypt-pim.img", img)
	h, err := OpenTCryptPIM(img, pass, 3)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(h.Key, key) || h.Iterations != 18000 {
		t.Fatalf("OpenTCryptPIM: key equal %v, %d iterations", bytes.Equal(h.Key, key), h.Iterations)
	}
	tcryptCheckDump(t, cs, dev, pass, h, "--veracrypt-pim", "3", "--hash", "sha512")
	cs.fails(append(bytes.Clone(pass), '\n'), "tcryptDump", "-q", "--veracrypt", "--veracrypt-pim", "4", "--hash", "sha512", dev)
}

// TestGuestTCryptTcplayToOurs: OpenTCrypt opens volumes tcplay created
// and finds the key cryptsetup finds.
func TestGuestTCryptTcplayToOurs(t *testing.T) {
	testvm.RequireGuest(t)
	cs := needCryptsetup(t)
	tcplay := requireTool(t, "tcplay")
	script := requireTool(t, "script")
	losetup := requireTool(t, "losetup")
	pass := []byte("tcplay test passphrase")
	for _, tc := range []struct {
		name, tcplayPRF, prf string
		keyfile              bool
		tcplayCipher, cipher string // "": AES-256-XTS
	}{
		{"sha512", "SHA512", "sha512", false, "", ""},
		{"ripemd160", "RIPEMD160", "ripemd160", false, "", ""},
		{"whirlpool", "whirlpool", "whirlpool", false, "", ""},
		{"sha512-keyfile", "SHA512", "sha512", true, "", ""},
		{"sha512-twofish", "SHA512", "sha512", false, "TWOFISH-256-XTS", "twofish-xts-plain64"},
		{"ripemd160-serpent", "RIPEMD160", "ripemd160", false, "SERPENT-256-XTS", "serpent-xts-plain64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs := cs.in(t)
			const size = 8 << 20
			file := filepath.Join(t.TempDir(), "tcplay.img")
			if err := os.WriteFile(file, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(file, size); err != nil {
				t.Fatal(err)
			}
			// tcplay needs a block device (it asks the disk for its size).
			out, err := runTool(t, nil, losetup, "--find", "--show", file)
			if err != nil {
				t.Fatalf("losetup: %v\n%s", err, out)
			}
			loop := strings.TrimSpace(out)
			detached := false
			detach := func() {
				if !detached {
					detached = true
					if out, err := runTool(t, nil, losetup, "-d", loop); err != nil {
						t.Errorf("losetup -d %s: %v\n%s", loop, err, out)
					}
				}
			}
			t.Cleanup(detach)
			if tc.tcplayCipher == "" {
				tc.tcplayCipher, tc.cipher = "AES-256-XTS", "aes-xts-plain64"
			}
			cmdline := fmt.Sprintf("%s -c -d %s -a %s -b %s -z -w", tcplay, loop, tc.tcplayPRF, tc.tcplayCipher)
			var o TCryptOpen
			var dumpArgs []string
			if tc.keyfile {
				kf := filepath.Join(t.TempDir(), "keyfile")
				o.Keyfiles = [][]byte{randBytes(t, 2000)}
				if err := os.WriteFile(kf, o.Keyfiles[0], 0o600); err != nil {
					t.Fatal(err)
				}
				cmdline += " -k " + kf
				dumpArgs = []string{"--key-file", kf} // tcrypt: a keyfile, the passphrase still asked
			}
			tcplayCreate(t, script, cmdline, pass)
			detach()

			img := readFileT(t, file)
			if tc.keyfile {
				// Without the keyfile, the variant that opens it with the
				// keyfile does not. (Trying every variant, the VeraCrypt
				// ones too, which cannot open a tcplay header, took this
				// whole test from 22 s to 84 s in the guest.)
				if _, err := OpenTCryptKDF(img, pass, tc.prf, 1000); !errors.Is(err, ErrWrongPassphrase) {
					t.Fatalf("OpenTCrypt without the keyfile: %v", err)
				}
			}
			h, err := OpenTCryptWith(img, pass, o)
			if err != nil {
				t.Fatalf("OpenTCrypt of tcplay's header: %v", err)
			}
			if h.VeraCrypt || h.PRF != tc.prf || h.Cipher != tc.cipher || h.Version != 5 || h.SectorSize != 512 ||
				h.HiddenSize != 0 || h.Flags != 0 || h.DataOffset != 131072 || h.DataSize != size-2*131072 || h.VolumeSize != h.DataSize {
				got := *h
				got.Key = nil
				t.Errorf("tcplay's header: %+v", got)
			}
			tcryptCheckDump(t, cs, file, pass, h, dumpArgs...)
		})
	}
}

// TestGuestTCryptKeyfileOursToCryptsetup: cryptsetup opens a header
// CreateTCrypt made with two keyfiles (given to cryptsetup as tcrypt key
// files, the passphrase asked), and refuses it with one of them only.
func TestGuestTCryptKeyfileOursToCryptsetup(t *testing.T) {
	testvm.RequireGuest(t)
	cs := needCryptsetup(t)
	pass := []byte("tcrypt keyfile passphrase")
	const size = 4 << 20
	dir := t.TempDir()
	kfs := [][]byte{randBytes(t, 100), randBytes(t, 5000)}
	var paths []string
	for i, kf := range kfs {
		p := filepath.Join(dir, fmt.Sprintf("kf%d", i))
		if err := os.WriteFile(p, kf, 0o600); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	key := randBytes(t, 64)
	p := TCryptParams{PRF: "sha512", Key: key, DataOffset: 131072, DataSize: size - 2*131072, VolumeSize: size - 2*131072, Keyfiles: kfs}
	img := make([]byte, size)
	copy(img, newTCrypt(t, p, pass))
	dev := writeTemp(t, "tcrypt-kf.img", img)
	h, err := OpenTCryptWith(img, pass, TCryptOpen{Keyfiles: kfs})
	if err != nil || !bytes.Equal(h.Key, key) {
		t.Fatalf("OpenTCryptWith: %v", err)
	}
	tcryptCheckDump(t, cs, dev, pass, h, "--key-file", paths[0], "--key-file", paths[1], "--disable-veracrypt", "--hash", "sha512")
	cs.fails(append(bytes.Clone(pass), '\n'), "tcryptDump", "-q", "--disable-veracrypt", "--hash", "sha512", "--key-file", paths[0], dev)
}

// tcplayCreate runs a tcplay -c command line under script(1), which
// gives it the terminal it reads the passphrase from, and answers its
// prompts as they appear.
func tcplayCreate(t *testing.T, script, cmdline string, pass []byte) {
	t.Helper()
	cmd := exec.Command(script, "-qec", cmdline, "/dev/null")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	finished := false
	t.Cleanup(func() {
		if !finished {
			_ = cmd.Process.Kill()
			_ = pw.Close()
		}
	})
	var (
		mu   sync.Mutex
		seen bytes.Buffer
	)
	prompt := make(chan struct{}, 16)
	go func() {
		r := bufio.NewReader(pr)
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			if n > 0 {
				mu.Lock()
				seen.Write(buf[:n])
				mu.Unlock()
				select { // never block the copy from tcplay
				case prompt <- struct{}{}:
				default:
				}
			}
			if err != nil {
				close(prompt)
				return
			}
		}
	}()
	output := func() string { mu.Lock(); defer mu.Unlock(); return seen.String() }
	waitFor := func(s string, count int) {
		deadline := time.After(2 * time.Minute)
		for strings.Count(output(), s) < count {
			select {
			case _, ok := <-prompt:
				if !ok {
					t.Fatalf("tcplay ended before %q:\n%s", s, output())
				}
			case <-deadline:
				t.Fatalf("tcplay did not ask %q:\n%s", s, output())
			}
		}
	}
	answers := []struct {
		prompt string
		count  int
		answer []byte
	}{
		{"Passphrase:", 1, pass},
		{"Repeat passphrase:", 1, pass},
		{"(y/n)", 1, []byte("y")},
	}
	for _, a := range answers {
		waitFor(a.prompt, a.count)
		time.Sleep(200 * time.Millisecond) // let tcplay switch the terminal to its read
		if _, err := stdin.Write(append(bytes.Clone(a.answer), '\n')); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var werr error
	select {
	case werr = <-done:
	case <-time.After(5 * time.Minute):
		_ = cmd.Process.Kill()
		werr = <-done
	}
	finished = true
	stdin.Close()
	pw.Close()
	if werr != nil || !strings.Contains(output(), "All done!") {
		t.Fatalf("tcplay -c: %v\n%s", werr, output())
	}
}

// Serpent against the Linux kernel's test vectors (crypto/testmgr.h: key
// and plaintext counting up from zero), and a decryption round trip.
func TestSerpent(t *testing.T) {
	for _, c := range []struct {
		keyLen int
		want   string
	}{
		{16, "4c7d8a328072a22c823e4a1f3acda16d"},
		{32, "de269ff833e432b85b2e88d2701ce75c"},
	} {
		key := make([]byte, c.keyLen)
		for i := range key {
			key[i] = byte(i)
		}
		pt := make([]byte, 16)
		for i := range pt {
			pt[i] = byte(i)
		}
		b, err := newSerpent(key)
		if err != nil {
			t.Fatal(err)
		}
		ct := make([]byte, 16)
		b.Encrypt(ct, pt)
		if got := hex.EncodeToString(ct); got != c.want {
			t.Errorf("%d-byte key: %s, want %s", c.keyLen, got, c.want)
		}
		back := make([]byte, 16)
		b.Decrypt(back, ct)
		if !bytes.Equal(back, pt) {
			t.Errorf("%d-byte key: decryption gives %x", c.keyLen, back)
		}
	}
	if _, err := newSerpent(make([]byte, 20)); err == nil {
		t.Fatal("a 20-byte key was accepted")
	}
	// A Serpent-XTS TrueCrypt header opens, naming the cipher.
	withTCryptKDFs(t, fastTCrypt)
	key := randBytes(t, 64)
	sec := newTCrypt(t, TCryptParams{PRF: "sha512", Cipher: "serpent-xts-plain64", Key: key, DataSize: 1 << 20}, []byte("pw"))
	h, err := OpenTCrypt(sec, []byte("pw"))
	if err != nil || h.Cipher != "serpent-xts-plain64" || !bytes.Equal(h.Key, key) {
		t.Fatalf("OpenTCrypt of a Serpent header: %v", err)
	}
}
