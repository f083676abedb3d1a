package luks

import (
	"bytes"
	"errors"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// TestRequirementBlocksCryptsetup: while our mandatory requirement is set,
// stock cryptsetup refuses to open the device (and to restore a backup of
// it), our own Unlock still works, and the checkpoint token round-trips;
// after clearing it cryptsetup opens the device again and keeps our token
// through its own header rewrites.
func TestRequirementBlocksCryptsetup(t *testing.T) {
	cs := needCryptsetup(t)
	vk, _ := NewVolumeKey(64)
	h, err := Create(Options{PBKDF: testPBKDF2, HeaderSize: 1 << 20}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SetRequirement(RequirementDmconvert); err != nil {
		t.Fatal(err)
	}
	payload := []byte("\x00\x01phase=3 boundary=123456\xff")
	if err := h.SetCheckpoint(payload); err != nil {
		t.Fatal(err)
	}
	dev := writeImage(t, h)

	// cryptsetup 2.6.1 checks mandatory requirements when it activates a
	// device (LUKS2_activate: "Unmet LUKS2 requirements detected") and
	// before any header change, but not for a mere passphrase test:
	// `open --test-passphrase` succeeds. Activation itself needs
	// device-mapper, so TestGuestRequirementBlocksActivation checks it in
	// the VM; here we check the header operations it refuses.
	cs.ok([]byte("pw\n"), "open", "--test-passphrase", dev)
	dump := cs.ok(nil, "luksDump", dev)
	if !regexp.MustCompile(`Requirements:\s+dmconvert`).MatchString(dump) {
		t.Errorf("luksDump does not show the requirement:\n%s", dump)
	}
	pwFile := writeTemp(t, "pw", []byte("pw"))
	other := writeTemp(t, "other", []byte("other"))
	out := cs.fails(nil, append(append([]string{"luksAddKey", "--batch-mode", "--key-file", pwFile}, cryptsetupPBKDFArgs(testPBKDF2)...), dev, other)...)
	if !strings.Contains(out, "Unmet LUKS2 requirements detected") {
		t.Errorf("luksAddKey refused, but not for the requirement:\n%s", out)
	}
	bk := writeTemp(t, "unused", nil) + ".bk"
	cs.ok(nil, "luksHeaderBackup", "--header-backup-file", bk, dev)
	out = cs.fails(nil, "luksHeaderRestore", "--batch-mode", "--header-backup-file", bk, deviceFile(t, nil, 2<<20))
	if !strings.Contains(out, "requirements") {
		t.Errorf("luksHeaderRestore refused, but not for the requirement:\n%s", out)
	}

	// Our side: read, unlock, checkpoint.
	back := readHeader(t, dev)
	if got := back.Requirements(); len(got) != 1 || got[0] != RequirementDmconvert {
		t.Fatalf("requirements %v", got)
	}
	got, _, err := back.Unlock([]byte("pw"))
	if err != nil || !got.Equal(vk) {
		t.Fatalf("our unlock under the requirement: %v", err)
	}
	if cp, err := back.Checkpoint(); err != nil || !bytes.Equal(cp, payload) {
		t.Fatalf("checkpoint %q, %v", cp, err)
	}

	// Per-step checkpoints: SaveCheckpoint bumps seqid, both copies.
	f, err := openRW(dev)
	if err != nil {
		t.Fatal(err)
	}
	seq := back.SeqID()
	for i := 0; i < 3; i++ {
		if err := back.SaveCheckpoint(f, []byte("step "+strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	if back.SeqID() != seq+3 {
		t.Fatalf("seqid %d, want %d", back.SeqID(), seq+3)
	}
	again := readHeader(t, dev)
	if cp, _ := again.Checkpoint(); string(cp) != "step 2" || again.SeqID() != seq+3 {
		t.Fatalf("re-read checkpoint %q seqid %d", cp, again.SeqID())
	}
	for i, c := range again.Copies() {
		if !c.Valid || c.Err != nil || c.SeqID != seq+3 {
			t.Fatalf("copy %d: %+v", i, c)
		}
	}

	// Finalize: clear requirement, keep the token for now.
	if err := again.ClearRequirement(RequirementDmconvert); err != nil {
		t.Fatal(err)
	}
	if err := again.WriteMetadata(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	cs.ok([]byte("pw\n"), "open", "--test-passphrase", dev)
	if d := cs.ok(nil, "luksDump", dev); regexp.MustCompile(`Requirements:\s+dmconvert`).MatchString(d) {
		t.Errorf("requirement still shown after clearing:\n%s", d)
	}
	// cryptsetup rewrites the header (adds a keyslot); our token survives.
	cs.ok(nil, append(append([]string{"luksAddKey", "--batch-mode", "--key-file", pwFile}, cryptsetupPBKDFArgs(testPBKDF2)...), dev, other)...)
	exp := cs.ok(nil, "token", "export", "--token-id", "0", dev)
	tok, _ := again.Token(0)
	if !jsonEqual(t, []byte(exp), tok) {
		t.Fatalf("cryptsetup exports %s, we wrote %s", exp, tok)
	}
	after := readHeader(t, dev)
	if cp, err := after.Checkpoint(); err != nil || string(cp) != "step 2" {
		t.Fatalf("checkpoint after cryptsetup rewrite: %q, %v", cp, err)
	}
	after.RemoveCheckpoint()
	if _, err := after.Checkpoint(); !errors.Is(err, ErrNoCheckpoint) {
		t.Fatalf("after RemoveCheckpoint: %v", err)
	}
	if len(after.TokenIDs()) != 0 {
		t.Fatalf("tokens left: %v", after.TokenIDs())
	}
}

// TestWriteMetadataTouchesOnlyMetadata: the per-step write covers both
// metadata copies, nothing of the keyslot area or beyond, and bumps seqid.
func TestWriteMetadataTouchesOnlyMetadata(t *testing.T) {
	vk, _ := NewVolumeKey(64)
	h, err := Create(Options{PBKDF: testPBKDF2}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	img, _ := h.Image()
	w := &recordingWriter{buf: append([]byte{}, img...)}
	if err := h.SaveCheckpoint(w, []byte("x")); err != nil {
		t.Fatal(err)
	}
	md := h.MetadataSize()
	if len(w.writes) != 2 || w.writes[0] != [2]int64{0, md} || w.writes[1] != [2]int64{md, 2 * md} {
		t.Fatalf("writes %v, want primary [0,%d) then secondary [%d,%d)", w.writes, md, md, 2*md)
	}
	if !bytes.Equal(w.buf[2*md:], img[2*md:]) {
		t.Fatal("keyslot area changed")
	}
	back, err := Read(bytes.NewReader(w.buf))
	if err != nil || back.SeqID() != 2 {
		t.Fatalf("read back: seqid %d, %v", back.SeqID(), err)
	}
	// WriteHeader with FirstBlockFirst/Last: two writes, in that order.
	for _, order := range []WriteOrder{FirstBlockFirst, FirstBlockLast} {
		w := &recordingWriter{buf: make([]byte, h.HeaderSize())}
		if err := h.WriteHeader(w, order); err != nil {
			t.Fatal(err)
		}
		first := [2]int64{0, FirstBlockSize}
		rest := [2]int64{FirstBlockSize, h.HeaderSize()}
		want := [][2]int64{first, rest}
		if order == FirstBlockLast {
			want = [][2]int64{rest, first}
		}
		if len(w.writes) != 2 || w.writes[0] != want[0] || w.writes[1] != want[1] {
			t.Fatalf("order %d: writes %v, want %v", order, w.writes, want)
		}
		fb, _ := h.FirstBlock()
		if !bytes.Equal(fb, w.buf[:FirstBlockSize]) {
			t.Fatal("FirstBlock differs from the image's first block")
		}
	}
}

type recordingWriter struct {
	buf    []byte
	writes [][2]int64
	syncs  int
}

func (w *recordingWriter) WriteAt(p []byte, off int64) (int, error) {
	w.writes = append(w.writes, [2]int64{off, off + int64(len(p))})
	if int(off)+len(p) > len(w.buf) {
		w.buf = append(w.buf, make([]byte, int(off)+len(p)-len(w.buf))...)
	}
	copy(w.buf[off:], p)
	return len(p), nil
}

func (w *recordingWriter) ReadAt(p []byte, off int64) (int, error) {
	return bytes.NewReader(w.buf).ReadAt(p, off)
}

func (w *recordingWriter) Sync() error { w.syncs++; return nil }

// TestLUKS1Disguise: a disguised LUKS1 header is recognised by neither
// cryptsetup nor blkid, we read and unlock it, the checkpoint record pair
// works (newest valid wins, a torn newest falls back to the older), and
// Reveal makes it a standard LUKS1 device again.
func TestLUKS1Disguise(t *testing.T) {
	cs := needCryptsetup(t)
	blkid := requireTool(t, "blkid")
	vk, _ := NewVolumeKey(64)
	h, err := Create(Options{Version: 1, PBKDF: testPBKDF2}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.SetDisguised(true); err != nil {
		t.Fatal(err)
	}
	if err := h.SetCheckpoint([]byte("initial")); err != nil {
		t.Fatal(err)
	}
	img, _ := h.Image()
	if !bytes.Equal(img[:8], []byte("DMCVT\xba\xbe\x01")) {
		t.Fatalf("first bytes %q", img[:8])
	}
	dev := deviceFile(t, img, 1<<20)
	cs.fails([]byte("pw\n"), "open", "--test-passphrase", dev)
	cs.fails(nil, "luksDump", dev)
	cs.fails(nil, "isLuks", dev)
	if out, err := runTool(t, nil, blkid, "-p", dev); err == nil || strings.Contains(out, "LUKS") {
		t.Fatalf("blkid recognises the disguised header: %v\n%s", err, out)
	}

	back := readHeader(t, dev)
	if !back.Disguised() || back.Version() != 1 {
		t.Fatalf("disguised %v version %d", back.Disguised(), back.Version())
	}
	if got, _, err := back.Unlock([]byte("pw")); err != nil || !got.Equal(vk) {
		t.Fatalf("unlock disguised: %v", err)
	}
	if cp, err := back.Checkpoint(); err != nil || string(cp) != "initial" || back.CheckpointSeq() != 1 {
		t.Fatalf("checkpoint %q seq %d %v", cp, back.CheckpointSeq(), err)
	}
	f, err := openRW(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := 2; i <= 5; i++ {
		if err := back.SaveCheckpoint(f, []byte("rec "+strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	area, err := back.CheckpointArea()
	if err != nil || area != back.HeaderSize()-4096 {
		t.Fatalf("checkpoint area %d, %v", area, err)
	}
	r := readHeader(t, dev)
	if cp, _ := r.Checkpoint(); string(cp) != "rec 5" || r.CheckpointSeq() != 5 {
		t.Fatalf("newest record %q seq %d", cp, r.CheckpointSeq())
	}
	// Tear the newest record (seq 5 lives in slot 1): the older one wins.
	if _, err := f.WriteAt([]byte("garbage"), area+CheckpointRecordSize+30); err != nil {
		t.Fatal(err)
	}
	if cp, err := r.LoadCheckpoint(f); err != nil || string(cp) != "rec 4" || r.CheckpointSeq() != 4 {
		t.Fatalf("after tearing: %q seq %d %v", cp, r.CheckpointSeq(), err)
	}
	// The next save replaces the torn slot's partner correctly.
	if err := r.SaveCheckpoint(f, []byte("rec 5b")); err != nil {
		t.Fatal(err)
	}
	if cp, err := readHeader(t, dev).Checkpoint(); err != nil || string(cp) != "rec 5b" {
		t.Fatalf("after re-save: %q %v", cp, err)
	}
	// A payload that does not fit is refused.
	if err := r.SaveCheckpoint(f, make([]byte, CheckpointPayloadMax+1)); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("oversized payload: %v", err)
	}

	// Reveal: only the first block changes; cryptsetup and blkid see LUKS.
	before := readFileT(t, dev)
	if err := r.Reveal(f); err != nil {
		t.Fatal(err)
	}
	after := readFileT(t, dev)
	if !bytes.Equal(before[FirstBlockSize:], after[FirstBlockSize:]) {
		t.Fatal("Reveal wrote beyond the first block")
	}
	cs.ok([]byte("pw\n"), "open", "--test-passphrase", dev)
	if out, err := runTool(t, nil, blkid, "-p", "-o", "value", "-s", "TYPE", dev); err != nil || strings.TrimSpace(out) != "crypto_LUKS" {
		t.Fatalf("blkid after reveal: %v %q", err, out)
	}
	if err := r.WipeCheckpointRecords(f); err != nil {
		t.Fatal(err)
	}
	if _, err := readHeader(t, dev).Checkpoint(); !errors.Is(err, ErrNoCheckpoint) {
		t.Fatalf("after wiping records: %v", err)
	}
	cs.ok([]byte("pw\n"), "open", "--test-passphrase", dev)
}

// TestLUKS1CheckpointRoom: the records need the keyslot material to end
// before the last 4 KiB of the header area; a minimum-size header is
// refused.
func TestLUKS1CheckpointRoom(t *testing.T) {
	vk, _ := NewVolumeKey(64)
	h, err := Create(Options{Version: 1, PBKDF: testPBKDF2, HeaderSize: MinHeaderSize(1, 64, 0)}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.CheckCheckpointRoom(); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("CheckCheckpointRoom on a minimum header: %v", err)
	}
	if err := h.SetDisguised(true); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("SetDisguised on a minimum header: %v", err)
	}
	if err := h.SetCheckpoint([]byte("x")); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("SetCheckpoint on a minimum header: %v", err)
	}
	h2, err := Create(Options{Version: 1, PBKDF: testPBKDF2, HeaderSize: MinHeaderSize(1, 64, 0) + 4096}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := h2.CheckCheckpointRoom(); err != nil {
		t.Fatalf("one extra 4 KiB should be enough: %v", err)
	}
	l2, _ := Create(Options{PBKDF: testPBKDF2}, vk, []byte("pw"))
	if err := l2.SetDisguised(true); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("SetDisguised on LUKS2: %v", err)
	}
}

// TestCheckpointRecordMatchesImage: CheckpointRecord gives the bytes and
// offset Image holds for the current LUKS1 record, in both slots; LUKS2
// has none.
func TestCheckpointRecordMatchesImage(t *testing.T) {
	vk, _ := NewVolumeKey(64)
	h, err := Create(Options{Version: 1, PBKDF: testPBKDF2}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := h.CheckpointRecord(); !errors.Is(err, ErrNoCheckpoint) {
		t.Fatalf("CheckpointRecord without a checkpoint: %v", err)
	}
	for i := 1; i <= 3; i++ {
		if err := h.SetCheckpoint([]byte("record " + strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
		off, rec, err := h.CheckpointRecord()
		if err != nil {
			t.Fatal(err)
		}
		img, err := h.Image()
		if err != nil {
			t.Fatal(err)
		}
		if len(rec) != CheckpointRecordSize || !bytes.Equal(img[off:off+CheckpointRecordSize], rec) {
			t.Fatalf("record %d at %d differs from the image's", i, off)
		}
		if seq, p, ok := decodeCheckpointRecord(rec); !ok || seq != uint64(i) || string(p) != "record "+strconv.Itoa(i) {
			t.Fatalf("record %d decodes to %d %q %v", i, seq, p, ok)
		}
	}
	h2, err := Create(Options{Version: 2, PBKDF: testPBKDF2}, vk, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := h2.CheckpointRecord(); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("CheckpointRecord of LUKS2: %v", err)
	}
}
