package convert

import (
	"bytes"
	"errors"
	"testing"

	"github.com/dmconvert/dmconvert/luks"
)

// The key OpenLUKSImage returns is the header's volume key, and it stays
// intact after the call (it was once the luks key's own buffer, zeroed by
// a deferred Wipe: resume then rebuilt the helper with an all-zero key).
func TestOpenLUKSImageReturnsTheKey(t *testing.T) {
	for _, version := range []int{1, 2} {
		key := bytes.Repeat([]byte{0x5a, 0xa5}, 32)
		vk := luks.NewVolumeKeyFromBytes(key)
		o := luks.Options{Version: version, HeaderSize: 4 << 20, PBKDF: luks.PBKDF{Type: luks.KDFPBKDF2, Iterations: luks.MinPBKDF2Iterations}}
		if version == 1 {
			o.HeaderSize = 2 << 20
		}
		h, err := luks.Create(o, vk, []byte("pass"))
		vk.Wipe()
		if err != nil {
			t.Fatal(err)
		}
		lh, err := NewLUKSHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		img, err := lh.Image(Checkpoint{Run: "r"})
		if err != nil {
			t.Fatal(err)
		}
		_, ks, err := OpenLUKSImage(img, []byte("pass"))
		if err != nil {
			t.Fatal(err)
		}
		got := ks.Bound
		got2 := append([]byte(nil), got...)
		if !bytes.Equal(got, key) || !bytes.Equal(got2, key) {
			t.Fatalf("LUKS%d: OpenLUKSImage returned %x, want %x", version, got, key)
		}
		if _, _, err := OpenLUKSImage(img, []byte("wrong")); !errors.Is(err, ErrWrongPassphrase) {
			t.Fatalf("LUKS%d: wrong passphrase gave %v", version, err)
		}
	}
}
