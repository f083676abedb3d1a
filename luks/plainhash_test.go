package luks

import (
	"encoding/hex"
	"errors"
	"testing"
)

// The rounds of PlainKey, against digests computed apart (Python's
// hashlib, same rounds). TestGuestPlainHash checks them against
// cryptsetup itself.
func TestPlainKey(t *testing.T) {
	for _, c := range []struct {
		spec, pass string
		size       int
		want       string
	}{
		// Two rounds: sha256("correct horse") || sha256("A" + "correct horse").
		{"sha256", "correct horse", 64, "4104d36f8da2c254349f85836793ebe029e0c957063a34c91c2e9203187b5631c51aefc7f409f4df0888cd78c638b969db451fa1e040e06e2a9ed77f2ae083d5"},
		// 20-byte digests: the second round's cut to 12 bytes.
		{"sha1", "pw", 32, "1a91d62f7ca67399625a4368a6ab5d4a3baa607388dc22ce537380cc9b030225"},
		{"ripemd160", "correct horse", 32, "424573ebba1ce1abc618a416178f79ad83442dfccd852f665c5536c935adea5c"},
		// ":16": 16 bytes of sha512(""), the rest zero.
		{"sha512:16", "", 64, "cf83e1357eefb8bdf1542850d66d8007" + zeros(48)},
		{"plain", "0123456789abcdef0123456789abcdef", 32, hex.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))},
		{"plain:4", "abcdefgh", 8, hex.EncodeToString([]byte("abcd")) + zeros(4)},
	} {
		k, err := PlainKey(c.spec, []byte(c.pass), c.size)
		if err != nil {
			t.Fatalf("%s: %v", c.spec, err)
		}
		if got := hex.EncodeToString(k); got != c.want {
			t.Errorf("PlainKey(%s, %q, %d) = %s, want %s", c.spec, c.pass, c.size, got, c.want)
		}
	}
	for _, c := range []struct {
		spec string
		size int
	}{
		{"whirlpool", 32}, {"sha256:0", 32}, {"sha256:x", 32}, {"sha256:33", 32}, {"plain", 64}, {"sha256", 0},
	} {
		if _, err := PlainKey(c.spec, []byte("short passphrase"), c.size); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("PlainKey(%s, size %d): %v, want ErrInvalidArgument", c.spec, c.size, err)
		}
	}
}

func zeros(n int) string { return hex.EncodeToString(make([]byte, n)) }
