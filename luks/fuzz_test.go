package luks

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// virtualDisk is head followed by zeros up to size: a whole "device"
// without allocating it, so fuzzed size fields can point anywhere.
type virtualDisk struct {
	head []byte
	size int64
}

func (d virtualDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	if off >= d.size {
		return 0, io.EOF
	}
	n := len(p)
	if int64(n) > d.size-off {
		n = int(d.size - off)
	}
	clear(p[:n])
	if off < int64(len(d.head)) {
		copy(p[:n], d.head[off:])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// exercise calls every read-only accessor and checks that a header we
// accepted re-serialises into one we accept again, unchanged.
func exercise(t *testing.T, h *Header) {
	_ = h.Version() + h.SectorSize() + h.VolumeKeySize() + len(h.Cipher()+h.UUID()+h.Label()+h.Subsystem())
	_ = h.DataOffset() + h.HeaderSize() + h.MetadataSize() + h.KeyslotsSize()
	_ = h.Keyslots()
	_ = h.Requirements()
	for _, id := range h.TokenIDs() {
		h.Token(id)
	}
	_, _ = h.Checkpoint()
	_ = h.Copies()
	_ = h.CheckCheckpointRoom()
	if h.HeaderSize() > 64<<20 {
		return // do not build huge images
	}
	img, err := h.Image()
	if err != nil {
		if h.v2 != nil && errors.Is(err, ErrNoSpace) {
			return // e.g. JSON accepted by a parser but re-emitted longer
		}
		t.Fatalf("Image of an accepted header: %v", err)
	}
	h2, err := Read(virtualDisk{img, int64(len(img))})
	if err != nil {
		t.Fatalf("re-reading our image of an accepted header: %v", err)
	}
	if h.v2 != nil && !bytes.Equal(h.v2.root.marshal(), h2.v2.root.marshal()) {
		t.Fatal("metadata changed in a round trip")
	}
	if h.v1 != nil && !bytes.Equal(h.v1.encodePhdr(), h2.v1.encodePhdr()) {
		t.Fatal("LUKS1 phdr changed in a round trip")
	}
}

func seedImages(f *testing.F) [][]byte {
	vk, _ := NewVolumeKey(32)
	h2, err := Create(Options{PBKDF: testPBKDF2, HeaderSize: MinHeaderSize(2, 32, 0)}, vk, []byte("p"))
	if err != nil {
		f.Fatal(err)
	}
	_ = h2.SetRequirement(RequirementDmconvert)
	_ = h2.SetCheckpoint([]byte("cp"))
	img2, _ := h2.Image()
	h1, err := Create(Options{Version: 1, PBKDF: testPBKDF2, Cipher: "aes-cbc-essiv:sha256"}, vk, []byte("p"))
	if err != nil {
		f.Fatal(err)
	}
	img1, _ := h1.Image()
	return [][]byte{img2, img1}
}

// FuzzRead feeds arbitrary bytes (prefixes and mutations of real headers
// among them) to Read: errors are fine, panics are not.
func FuzzRead(f *testing.F) {
	imgs := seedImages(f)
	f.Add(imgs[0][:4096])
	f.Add(imgs[0][:20000])
	f.Add(imgs[1][:1024])
	f.Add([]byte("LUKS\xba\xbe\x00\x02"))
	f.Add([]byte("DMCVT\xba\xbe\x01"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, size := range []int64{int64(len(data)), 32 << 20} {
			h, err := Read(virtualDisk{data, size})
			if err != nil {
				continue
			}
			exercise(t, h)
		}
	})
}

// FuzzReadLUKS2JSON wraps arbitrary JSON text in a LUKS2 binary header
// with a correct checksum (random mutation alone never gets past the
// checksum), so the JSON validation and the typed views are fuzzed.
func FuzzReadLUKS2JSON(f *testing.F) {
	imgs := seedImages(f)
	h, _ := Read(bytes.NewReader(imgs[0]))
	text, _ := h.v2.jsonText()
	f.Add(text)
	f.Add([]byte(`{"keyslots":{},"tokens":{},"segments":{"0":{"type":"crypt","offset":"163840","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":512}},"digests":{"0":{"type":"pbkdf2","keyslots":[],"segments":["0"],"hash":"sha256","iterations":1000,"salt":"","digest":""}},"config":{"json_size":"12288","keyslots_size":"131072"}}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, text []byte) {
		const md = DefaultMetadataSize
		if len(text) >= md-luks2BinSize {
			return
		}
		l := &luks2{hdrSize: md, seqid: 1, csumAlg: "sha256", uuid: "0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f"}
		var img []byte
		for _, sec := range []bool{false, true} {
			b := make([]byte, md)
			off := uint64(0)
			if sec {
				off = md
			}
			copy(b, encodeBin2(bin2{hdrSize: md, seqid: 1, hdrOffset: off, csumAlg: l.csumAlg, uuid: l.uuid}, sec))
			copy(b[luks2BinSize:], text)
			sum, _ := checksum2("sha256", b[:luks2BinSize], b[luks2BinSize:])
			copy(b[offCsum:], sum)
			img = append(img, b...)
		}
		hh, err := Read(virtualDisk{img, 160 << 20})
		if err != nil {
			return
		}
		exercise(t, hh)
		// Keyslot views parse for every keyslot, including hostile ones.
		for _, id := range hh.v2.activeKeyslots() {
			if k, err := hh.v2.keyslot(id); err == nil && k.typ == "luks2" {
				_ = k.kdf.validate()
			}
		}
		_, _, _ = hh.v2.segmentDigest()
	})
}

// FuzzCheckpointRecord: decoding never panics and accepts only what
// encoding produces.
func FuzzCheckpointRecord(f *testing.F) {
	f.Add(encodeCheckpointRecord(7, []byte("payload")))
	f.Add(make([]byte, 512))
	f.Fuzz(func(t *testing.T, b []byte) {
		seq, p, ok := decodeCheckpointRecord(b)
		if !ok {
			return
		}
		if !bytes.Equal(encodeCheckpointRecord(seq, p), b[:CheckpointRecordSize]) {
			t.Fatal("accepted a record that does not re-encode identically")
		}
	})
}
