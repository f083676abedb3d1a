package luks

import (
	"bytes"
	"strings"
	"testing"
)

// A header made detached (data at offset 0, or at 1 MiB for 32 MiB) is
// what cryptsetup reads for `--header FILE`: luksDump shows the segment,
// the passphrase opens it to the volume key.
func TestDetachedSegmentAgainstCryptsetup(t *testing.T) {
	cs := needCryptsetup(t)
	for _, c := range []struct {
		off, size int64
		offShown  string
		sizeShown string
	}{
		{0, 0, "offset: 0 [bytes]", "length: (whole device)"},
		{1 << 20, 32 << 20, "offset: 1048576 [bytes]", "length: 33554432 [bytes]"},
	} {
		vk := NewVolumeKeyFromBytes(randBytes(t, 64))
		pass := []byte("detached pass")
		h, err := Create(Options{HeaderSize: 1 << 20, PBKDF: PBKDF{Type: KDFPBKDF2, Iterations: 1000}}, vk, pass)
		if err != nil {
			t.Fatal(err)
		}
		if err := h.SetDetachedSegment(c.off, c.size); err != nil {
			t.Fatal(err)
		}
		img, err := h.Image()
		if err != nil {
			t.Fatal(err)
		}
		hdr := writeTemp(t, "hdr", img)
		dump := cs.ok(nil, "luksDump", hdr)
		if !strings.Contains(dump, c.offShown) || !strings.Contains(dump, c.sizeShown) {
			t.Fatalf("luksDump of the detached header lacks %q / %q:\n%s", c.offShown, c.sizeShown, dump)
		}
		kf := writeTemp(t, "pass", pass)
		if got := cs.dumpVolumeKey(hdr, kf); !bytes.Equal(got, vk.Bytes()) {
			t.Fatal("cryptsetup recovers another volume key from the detached header")
		}
		// And our reader takes it back.
		if _, err := Read(bytes.NewReader(img)); err != nil {
			t.Fatalf("reading the detached header back: %v", err)
		}
	}
	h, _ := Create(Options{HeaderSize: 1 << 20, PBKDF: PBKDF{Type: KDFPBKDF2, Iterations: 1000}}, NewVolumeKeyFromBytes(randBytes(t, 64)), []byte("p"))
	if err := h.SetDetachedSegment(100, 0); err == nil {
		t.Fatal("a segment at byte 100 was accepted")
	}
}
