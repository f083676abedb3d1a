package convert

import (
	"strings"
	"testing"
)

func TestCheckCipher(t *testing.T) {
	for _, c := range []struct {
		cipher string
		bits   int
		want   string // "" = accepted
	}{
		{"aes-xts-plain64", 512, ""},
		{"aes-xts-plain64", 256, ""},
		{"aes-cbc-essiv:sha256", 256, ""},
		{"aes-cbc-essiv:sha256", 128, ""},
		// Not run by the luks package: the form is checked, the kernel
		// decides the rest.
		{"serpent-xts-plain64", 256, ""},
		{"serpent-xts-plain64", 512, ""},
		{"twofish-cbc-essiv:sha256", 256, ""},
		{"aes-xts-plain64be", 512, ""},
		{"aes-xts-plain64", 384, "takes a 256- or 512-bit key, not 384 bits"},
		{"aes-cbc-plain64", 512, "takes a 128-, 192- or 256-bit key, not 512 bits"},
		{"serpent-xts-plain64", 264, "XTS splits the key"},
		{"serpent-xts-plain64", 260, "not a multiple of 8"},
		{"serpent-xts-plain64", 0, "must be positive"},
		{"serpent-xts-plain64", 1032, "larger than LUKS2 allows"},
		{"", 256, "empty"},
		{"serpent", 256, "no chaining mode"},
		{"serpent-xts", 256, "no IV mode"},
		{"serpent--plain64", 256, "empty chaining mode"},
		{"serpent-xts-plain64:", 256, "empty IV options"},
		{"serpent-xts-plain64-x", 256, "form"},
		{"capi:xts(serpent)-plain64", 256, "capi:"},
		{"serpent:2-xts-plain64", 256, "multi-key"},
		{"cipher_null-ecb", 256, "unencrypted"},
		{"serpent-xts-plain 64", 256, "white space"},
		{"serpent-xts-pl\"ain64", 256, "character"},
	} {
		err := CheckCipher(c.cipher, c.bits)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%q %d: %v", c.cipher, c.bits, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%q %d: got %v, want %q", c.cipher, c.bits, err, c.want)
		}
	}
}

func TestRekeyCryptDefaults(t *testing.T) {
	src := CryptSpec{Cipher: "aes-xts-plain64", KeyBytes: 64, SectorSize: 4096, IVLargeSectors: true}
	for _, c := range []struct {
		cipher string
		bits   int
		want   CryptSpec
	}{
		{"", 0, src},
		{"", 256, CryptSpec{Cipher: "aes-xts-plain64", KeyBytes: 32, SectorSize: 4096, IVLargeSectors: true}},
		{"serpent-xts-plain64", 0, CryptSpec{Cipher: "serpent-xts-plain64", KeyBytes: 64, SectorSize: 4096, IVLargeSectors: true}},
		{"aes-cbc-essiv:sha256", 256, CryptSpec{Cipher: "aes-cbc-essiv:sha256", KeyBytes: 32, SectorSize: 4096, IVLargeSectors: true}},
	} {
		got, err := rekeyCrypt(src, c.cipher, c.bits)
		if err != nil || got != c.want {
			t.Errorf("%q %d: %+v, %v; want %+v", c.cipher, c.bits, got, err, c.want)
		}
	}
}

// The kernel's refusal is explained from /proc/crypto's names after the
// refused load.
func TestCipherRefusalReason(t *testing.T) {
	algs := parseProcCrypto(`name         : xts(aes)
driver       : xts-aes-aesni
module       : aesni_intel

name         : aes
driver       : aes-aesni

name         : serpent
driver       : serpent-generic
`)
	if !algs["xts(aes)"] || !algs["aes"] || !algs["serpent"] || algs["aes-aesni"] {
		t.Fatalf("parsed names %v", algs)
	}
	for _, c := range []struct{ cipher, want string }{
		{"twofish-xts-plain64", `no cipher "twofish"`},
		{"serpent-xts-plain64", "no xts mode for serpent"},
		{"aes-xts-plain65", `refuses IV mode "plain65" or the key size`},
		{"aes-xts-essiv:sha999", `IV mode "essiv:sha999"`},
	} {
		if got := cipherRefusal(CryptSpec{Cipher: c.cipher, KeyBytes: 64}, algs); !strings.Contains(got, c.want) {
			t.Errorf("%s: %q, want %q", c.cipher, got, c.want)
		}
	}
}

func TestCheckRekeyCipher(t *testing.T) {
	for _, c := range []struct {
		cipher string
		bits   int
		want   string
	}{
		{"", 0, ""},
		{"", 256, ""},
		{"", 1000, ""}, // the source's cipher decides: PlanRekey
		{"", 100, "not a multiple of 8"},
		{"serpent-xts-plain64", 0, ""},
		{"serpent-xts", 0, "no IV mode"},
		{"aes-xts-plain64", 384, "256- or 512-bit"},
	} {
		err := CheckRekeyCipher(c.cipher, c.bits)
		if (c.want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q %d: %v, want %q", c.cipher, c.bits, err, c.want)
		}
	}
}
