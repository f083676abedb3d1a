package luks

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// SetDataOffset: cryptsetup reads the moved offset and the smaller
// keyslots area, and the key still opens; an offset that would cut a
// keyslot is refused.
func TestSetDataOffset(t *testing.T) {
	cs := needCryptsetup(t)
	vk, _ := NewVolumeKey(64)
	h, err := Create(Options{PBKDF: testPBKDF2, HeaderSize: 16 << 20}, vk, []byte("pass"))
	if err != nil {
		t.Fatal(err)
	}
	end := h.KeyslotAreasEnd()
	if end <= 2*h.MetadataSize() || end > 1<<20 {
		t.Fatalf("keyslot areas end at %d", end)
	}
	if err := h.SetDataOffset(end - 4096); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("offset inside a keyslot area: %v", err)
	}
	if err := h.SetDataOffset(12 << 20); err != nil {
		t.Fatal(err)
	}
	if h.DataOffset() != 12<<20 || h.KeyslotsSize() != 12<<20-2*h.MetadataSize() {
		t.Fatalf("offset %d, keyslots size %d", h.DataOffset(), h.KeyslotsSize())
	}
	img, err := h.Image()
	if err != nil {
		t.Fatal(err)
	}
	if len(img) != 12<<20 {
		t.Fatalf("image is %d bytes, want the new data offset", len(img))
	}
	dev := deviceFile(t, img, 4<<20)
	dump := cs.ok(nil, "luksDump", dev)
	if !strings.Contains(dump, "offset: 12582912 [bytes]") {
		t.Fatalf("cryptsetup does not see the new offset:\n%s", dump)
	}
	kf := writeTemp(t, "key", []byte("pass"))
	cs.ok(nil, "open", "--test-passphrase", "--key-file", kf, dev)
	if got := cs.dumpVolumeKey(dev, kf); !bytes.Equal(got, vk.Bytes()) {
		t.Fatal("the volume key changed")
	}
	back := readHeader(t, dev)
	if back.DataOffset() != 12<<20 {
		t.Fatalf("read back offset %d", back.DataOffset())
	}
}
