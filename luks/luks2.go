package luks

import (
	"bytes"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"

	"golang.org/x/crypto/pbkdf2"
)

// LUKS2 on-disk constants (LUKS2 on-disk format specification, cryptsetup
// lib/luks2/luks2.h).
const (
	luks2BinSize         = 4096
	luks2MaxObjects      = 32 // keyslots, tokens, segments
	luks2MaxDigests      = 8
	luks2MaxKeyslotsSize = 128 << 20
	luks2AreaAlign       = 4096

	// DefaultMetadataSize is the LUKS2 default size of one metadata copy
	// (binary header + JSON area): 16 KiB.
	DefaultMetadataSize = 16 << 10
	// DefaultLUKS2HeaderSize is the LUKS2 default data offset: 16 MiB.
	DefaultLUKS2HeaderSize = 16 << 20
	// DefaultLUKS1HeaderSize is the LUKS1 default data offset: 2 MiB
	// (payload offset 4096 sectors).
	DefaultLUKS1HeaderSize = 2 << 20
)

// luks2MetadataSizes are the only metadata copy sizes cryptsetup accepts;
// they double as the places the secondary copy is searched for.
var luks2MetadataSizes = []uint64{0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000}

var (
	magicLUKS      = []byte("LUKS\xba\xbe")
	magicSecondary = []byte("SKUL\xba\xbe")
)

// Binary header field offsets (big-endian integers, NUL-padded strings).
const (
	offVersion   = 6
	offHdrSize   = 8
	offSeqID     = 16
	offLabel     = 24
	offCsumAlg   = 72
	offSalt      = 104
	offUUID      = 168
	offSubsystem = 208
	offHdrOffset = 256
	offCsum      = 448
	labelLen     = 48
	csumAlgLen   = 32
	saltLen2     = 64
	uuidLen      = 40
	csumLen      = 64
)

// CopyStatus describes one LUKS2 metadata copy as found by Read.
type CopyStatus struct {
	Offset int64  // byte offset of the copy
	SeqID  uint64 // its sequence id (0 if unreadable)
	Valid  bool   // checksum and JSON validated
	Used   bool   // this copy's metadata was loaded
	Err    error  // why it is not valid, or "stale" when older than the other
}

type luks2 struct {
	hdrSize   uint64
	seqid     uint64
	label     string
	subsystem string
	csumAlg   string
	uuid      string
	salt      [2][saltLen2]byte
	root      *object
	area      []byte // keyslots area, len == keyslots_size
	copies    [2]CopyStatus
}

func cstr(b []byte) string {
	b = b[:len(b)-1] // cryptsetup forces the last byte to NUL
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

type bin2 struct {
	hdrSize, seqid, hdrOffset uint64
	label, csumAlg, uuid, sub string
	salt                      [saltLen2]byte
}

func decodeBin2(b []byte, secondary bool, offset uint64) (bin2, error) {
	var h bin2
	want := magicLUKS
	if secondary {
		want = magicSecondary
	}
	if !bytes.Equal(b[:6], want) {
		return h, ErrNotLUKS
	}
	if v := binary.BigEndian.Uint16(b[offVersion:]); v != 2 {
		return h, fmt.Errorf("version %d: %w", v, ErrNotLUKS)
	}
	h.hdrSize = binary.BigEndian.Uint64(b[offHdrSize:])
	h.seqid = binary.BigEndian.Uint64(b[offSeqID:])
	h.hdrOffset = binary.BigEndian.Uint64(b[offHdrOffset:])
	h.label = cstr(b[offLabel : offLabel+labelLen])
	h.csumAlg = cstr(b[offCsumAlg : offCsumAlg+csumAlgLen])
	h.uuid = cstr(b[offUUID : offUUID+uuidLen])
	h.sub = cstr(b[offSubsystem : offSubsystem+labelLen])
	copy(h.salt[:], b[offSalt:offSalt+saltLen2])
	if h.hdrOffset != offset {
		return h, fmt.Errorf("header offset field %d, found at %d: %w", h.hdrOffset, offset, ErrCorrupt)
	}
	if !slices.Contains(luks2MetadataSizes, h.hdrSize) {
		return h, fmt.Errorf("metadata size %d: %w", h.hdrSize, ErrCorrupt)
	}
	if secondary && offset != h.hdrSize {
		return h, fmt.Errorf("secondary header at %d but metadata size %d: %w", offset, h.hdrSize, ErrCorrupt)
	}
	return h, nil
}

func encodeBin2(h bin2, secondary bool) []byte {
	b := make([]byte, luks2BinSize)
	if secondary {
		copy(b, magicSecondary)
	} else {
		copy(b, magicLUKS)
	}
	binary.BigEndian.PutUint16(b[offVersion:], 2)
	binary.BigEndian.PutUint64(b[offHdrSize:], h.hdrSize)
	binary.BigEndian.PutUint64(b[offSeqID:], h.seqid)
	copy(b[offLabel:offLabel+labelLen-1], h.label)
	copy(b[offCsumAlg:offCsumAlg+csumAlgLen-1], h.csumAlg)
	copy(b[offSalt:offSalt+saltLen2], h.salt[:])
	copy(b[offUUID:offUUID+uuidLen-1], h.uuid)
	copy(b[offSubsystem:offSubsystem+labelLen-1], h.sub)
	binary.BigEndian.PutUint64(b[offHdrOffset:], h.hdrOffset)
	return b
}

// checksum2 computes the header checksum: hash over the binary header
// with the checksum field zeroed, followed by the whole JSON area.
func checksum2(alg string, bin, jsonArea []byte) ([]byte, error) {
	hf, err := hashByName(alg)
	if err != nil {
		return nil, err
	}
	if hf().Size() > csumLen {
		return nil, fmt.Errorf("checksum %q: %w", alg, ErrUnsupported)
	}
	h := hf()
	tmp := make([]byte, luks2BinSize)
	copy(tmp, bin)
	clear(tmp[offCsum : offCsum+csumLen])
	h.Write(tmp)
	h.Write(jsonArea)
	return h.Sum(nil), nil
}

// readAt reads exactly n bytes at off, growing the buffer in chunks so a
// lying size field on a short input does not cause a huge allocation.
func readAt(r io.ReaderAt, off int64, n int) ([]byte, error) {
	const chunk = 1 << 20
	buf := make([]byte, 0, min(n, chunk))
	for len(buf) < n {
		m := min(chunk, n-len(buf))
		start := len(buf)
		buf = append(buf, make([]byte, m)...)
		k, err := r.ReadAt(buf[start:], off+int64(start))
		if k < m {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	return buf, nil
}

type copy2 struct {
	bin  bin2
	root *object
}

// readCopy2 reads and fully validates one metadata copy.
func readCopy2(r io.ReaderAt, offset uint64, secondary bool) (*copy2, error) {
	b, err := readAt(r, int64(offset), luks2BinSize)
	if err != nil {
		return nil, err
	}
	h, err := decodeBin2(b, secondary, offset)
	if err != nil {
		return nil, err
	}
	area, err := readAt(r, int64(offset)+luks2BinSize, int(h.hdrSize)-luks2BinSize)
	if err != nil {
		return nil, err
	}
	sum, err := checksum2(h.csumAlg, b, area)
	if err != nil {
		return nil, err
	}
	if subtle.ConstantTimeCompare(sum, b[offCsum:offCsum+len(sum)]) != 1 {
		return nil, fmt.Errorf("checksum mismatch: %w", ErrCorrupt)
	}
	root, err := parseJSONArea(area)
	if err != nil {
		return nil, err
	}
	if err := validate2(root, h.hdrSize); err != nil {
		return nil, err
	}
	return &copy2{bin: h, root: root}, nil
}

// parseJSONArea applies cryptsetup's rules: the area starts with '{', the
// object is followed only by NUL bytes, and at least one NUL terminates it.
func parseJSONArea(area []byte) (*object, error) {
	end := bytes.IndexByte(area, 0)
	if end < 0 {
		return nil, fmt.Errorf("JSON area has no terminating NUL: %w", ErrCorrupt)
	}
	text := area[:end]
	if len(text) == 0 || text[0] != '{' || text[len(text)-1] != '}' {
		return nil, fmt.Errorf("JSON area does not hold one bare object: %w", ErrCorrupt)
	}
	for _, c := range area[end:] {
		if c != 0 {
			return nil, fmt.Errorf("non-NUL data after the JSON text: %w", ErrCorrupt)
		}
	}
	root, err := parseObject(text)
	if err != nil {
		return nil, fmt.Errorf("JSON: %v: %w", err, ErrCorrupt)
	}
	return root, nil
}

// readLUKS2 reads both metadata copies, picks the valid one with the
// higher sequence id (the primary on a tie), and loads the keyslots area.
func readLUKS2(r io.ReaderAt) (*luks2, error) {
	l := &luks2{}
	var c [2]*copy2
	var errs [2]error
	c[0], errs[0] = readCopy2(r, 0, false)
	l.copies[0] = CopyStatus{Offset: 0, Valid: errs[0] == nil, Err: errs[0]}
	if c[0] != nil {
		l.copies[0].SeqID = c[0].bin.seqid
		c[1], errs[1] = readCopy2(r, c[0].bin.hdrSize, true)
		l.copies[1] = CopyStatus{Offset: int64(c[0].bin.hdrSize), Valid: errs[1] == nil, Err: errs[1]}
	} else {
		// Primary unusable: look for the secondary at every legal offset.
		errs[1] = ErrNotLUKS
		for _, off := range luks2MetadataSizes {
			var err error
			c[1], err = readCopy2(r, off, true)
			if err == nil {
				errs[1] = nil
				l.copies[1] = CopyStatus{Offset: int64(off), Valid: true}
				break
			}
			if !errors.Is(err, ErrNotLUKS) && !errors.Is(err, io.ErrUnexpectedEOF) {
				errs[1] = err
				l.copies[1] = CopyStatus{Offset: int64(off), Err: err}
			}
		}
		if errs[1] != nil && l.copies[1].Err == nil {
			l.copies[1].Err = errs[1]
		}
	}
	if c[1] != nil {
		l.copies[1].SeqID = c[1].bin.seqid
	}
	use := -1
	switch {
	case c[0] != nil && c[1] != nil:
		use = 0
		if c[1].bin.seqid > c[0].bin.seqid {
			use = 1
			l.copies[0].Err = fmt.Errorf("stale copy (seqid %d < %d)", c[0].bin.seqid, c[1].bin.seqid)
		} else if c[1].bin.seqid < c[0].bin.seqid {
			l.copies[1].Err = fmt.Errorf("stale copy (seqid %d < %d)", c[1].bin.seqid, c[0].bin.seqid)
		}
	case c[0] != nil:
		use = 0
	case c[1] != nil:
		use = 1
	default:
		if errors.Is(errs[0], ErrNotLUKS) && errors.Is(errs[1], ErrNotLUKS) {
			return nil, ErrNotLUKS
		}
		// Wrap the more telling error: a damaged copy beats a missing one.
		if errors.Is(errs[0], ErrNotLUKS) {
			return nil, fmt.Errorf("no valid LUKS2 metadata copy: primary: %v; secondary: %w", errs[0], errs[1])
		}
		return nil, fmt.Errorf("no valid LUKS2 metadata copy: secondary: %v; primary: %w", errs[1], errs[0])
	}
	l.copies[use].Used = true
	u := c[use]
	l.hdrSize = u.bin.hdrSize
	l.seqid = u.bin.seqid
	l.label, l.subsystem, l.csumAlg, l.uuid = u.bin.label, u.bin.sub, u.bin.csumAlg, u.bin.uuid
	l.salt[use] = u.bin.salt
	if c[1-use] != nil {
		l.salt[1-use] = c[1-use].bin.salt
	} else {
		s, err := randomBytes(saltLen2)
		if err != nil {
			return nil, err
		}
		copy(l.salt[1-use][:], s)
	}
	l.root = u.root
	ksz, _ := l.keyslotsSize()
	area, err := readAt(r, int64(2*l.hdrSize), int(ksz))
	if err != nil {
		return nil, fmt.Errorf("reading keyslots area (%d bytes at %d): %w", ksz, 2*l.hdrSize, err)
	}
	l.area = area
	return l, nil
}

// ---- JSON validation (mirrors cryptsetup's LUKS2_hdr_validate) ----

func corruptf(format string, a ...any) error {
	return fmt.Errorf(format+": %w", append(a, ErrCorrupt)...)
}

func section(root *object, name string) (*object, error) {
	raw, ok := root.get(name)
	if !ok {
		return nil, corruptf("JSON has no %q section", name)
	}
	o, err := parseObject(raw)
	if err != nil {
		return nil, corruptf("JSON %q section: %v", name, err)
	}
	return o, nil
}

func needString(o *object, key, what string) (string, error) {
	raw, ok := o.get(key)
	if !ok {
		return "", corruptf("%s has no %q", what, key)
	}
	s, ok := jsonString(raw)
	if !ok || s == "" {
		return "", corruptf("%s %q is not a non-empty string", what, key)
	}
	return s, nil
}

func needU64(o *object, key, what string) (uint64, error) {
	raw, ok := o.get(key)
	if !ok {
		return 0, corruptf("%s has no %q", what, key)
	}
	n, ok := u64String(raw)
	if !ok {
		return 0, corruptf("%s %q is not a decimal string", what, key)
	}
	return n, nil
}

func needU32(o *object, key, what string) (uint32, error) {
	raw, ok := o.get(key)
	if !ok {
		return 0, corruptf("%s has no %q", what, key)
	}
	n, ok := jsonUint32(raw)
	if !ok {
		return 0, corruptf("%s %q is not an integer in uint32 range", what, key)
	}
	return n, nil
}

func needObject(o *object, key, what string) (*object, error) {
	raw, ok := o.get(key)
	if !ok {
		return nil, corruptf("%s has no %q", what, key)
	}
	sub, err := parseObject(raw)
	if err != nil {
		return nil, corruptf("%s %q is not an object", what, key)
	}
	return sub, nil
}

func refArray(o *object, key, what string, target *object) ([]int, error) {
	raw, ok := o.get(key)
	if !ok {
		return nil, corruptf("%s has no %q array", what, key)
	}
	arr, ok := stringArray(raw)
	if !ok {
		return nil, corruptf("%s %q is not an array of strings", what, key)
	}
	ids := make([]int, 0, len(arr))
	for _, s := range arr {
		if _, ok := target.get(s); !ok {
			return nil, corruptf("%s %q references missing %q", what, key, s)
		}
		n, err := parseID(s)
		if err != nil {
			return nil, corruptf("%s %q: %v", what, key, err)
		}
		ids = append(ids, n)
	}
	return ids, nil
}

func validate2(root *object, hdrSize uint64) error {
	keyslots, err := section(root, "keyslots")
	if err != nil {
		return err
	}
	tokens, err := section(root, "tokens")
	if err != nil {
		return err
	}
	segments, err := section(root, "segments")
	if err != nil {
		return err
	}
	digests, err := section(root, "digests")
	if err != nil {
		return err
	}
	config, err := section(root, "config")
	if err != nil {
		return err
	}
	// requirements
	if raw, ok := config.get("requirements"); ok {
		req, err := parseObject(raw)
		if err != nil {
			return corruptf("config requirements is not an object")
		}
		if raw, ok := req.get("mandatory"); ok {
			if _, ok := stringArray(raw); !ok {
				return corruptf("config requirements mandatory is not an array of strings")
			}
		}
	}
	if raw, ok := config.get("flags"); ok {
		if _, ok := stringArray(raw); !ok {
			return corruptf("config flags is not an array of strings")
		}
	}
	// tokens
	for _, k := range tokens.keys {
		if _, err := parseID(k); err != nil {
			return corruptf("token: %v", err)
		}
		t, err := needObject(tokens, k, "tokens")
		if err != nil {
			return err
		}
		if _, err := needString(t, "type", "token "+k); err != nil {
			return err
		}
		if _, err := refArray(t, "keyslots", "token "+k, keyslots); err != nil {
			return err
		}
	}
	// digests
	segHasDigest := map[string]bool{}
	for _, k := range digests.keys {
		if _, err := parseID(k); err != nil {
			return corruptf("digest: %v", err)
		}
		d, err := needObject(digests, k, "digests")
		if err != nil {
			return err
		}
		if _, err := needString(d, "type", "digest "+k); err != nil {
			return err
		}
		if _, err := refArray(d, "keyslots", "digest "+k, keyslots); err != nil {
			return err
		}
		segs, err := refArray(d, "segments", "digest "+k, segments)
		if err != nil {
			return err
		}
		for _, s := range segs {
			segHasDigest[strconv.Itoa(s)] = true
		}
	}
	// segments
	if segments.len() < 1 {
		return corruptf("empty segments section")
	}
	var minOffset uint64
	type iv struct{ off, size uint64 } // size 0 = dynamic
	var regular []iv
	for i := 0; i < segments.len(); i++ {
		k := strconv.Itoa(i)
		s, err := needObject(segments, k, "segments")
		if err != nil {
			return corruptf("segments are not numbered 0..%d: %v", segments.len()-1, err)
		}
		typ, err := needString(s, "type", "segment "+k)
		if err != nil {
			return err
		}
		off, err := needU64(s, "offset", "segment "+k)
		if err != nil {
			return err
		}
		sizeStr, err := needString(s, "size", "segment "+k)
		if err != nil {
			return err
		}
		var size uint64
		if sizeStr != "dynamic" {
			size, err = needU64(s, "size", "segment "+k)
			if err != nil || size == 0 {
				return corruptf("segment %s size %q", k, sizeStr)
			}
		}
		if off%512 != 0 || size%512 != 0 {
			return corruptf("segment %s offset/size not 512-byte aligned", k)
		}
		if raw, ok := s.get("flags"); ok {
			if _, ok := stringArray(raw); !ok {
				return corruptf("segment %s flags is not an array of strings", k)
			}
		}
		if typ == "crypt" {
			if _, err := needU64(s, "iv_tweak", "segment "+k); err != nil {
				return err
			}
			if _, err := needString(s, "encryption", "segment "+k); err != nil {
				return err
			}
			ss, err := needU32(s, "sector_size", "segment "+k)
			if err != nil {
				return err
			}
			if ss == 0 || ss%512 != 0 {
				return corruptf("segment %s sector size %d", k, ss)
			}
			if size%uint64(ss) != 0 {
				return corruptf("segment %s size not aligned to its sector size", k)
			}
			if !segHasDigest[k] {
				return corruptf("crypt segment %s has no digest", k)
			}
		}
		if off != 0 && (minOffset == 0 || off < minOffset) {
			minOffset = off
		}
		if !isBackupSegment(s) {
			regular = append(regular, iv{off, size})
		}
	}
	for i, a := range regular {
		if a.size == 0 && i != len(regular)-1 {
			return corruptf("only the last segment may have dynamic size")
		}
		for j, b := range regular {
			if i != j && a.off >= b.off && (b.size == 0 || a.off < b.off+b.size) {
				return corruptf("segments %d and %d overlap", i, j)
			}
		}
	}
	// keyslots (generic part)
	for _, k := range keyslots.keys {
		if _, err := parseID(k); err != nil {
			return corruptf("keyslot: %v", err)
		}
		ks, err := needObject(keyslots, k, "keyslots")
		if err != nil {
			return err
		}
		if _, err := needString(ks, "type", "keyslot "+k); err != nil {
			return err
		}
		if _, err := needU32(ks, "key_size", "keyslot "+k); err != nil {
			return err
		}
	}
	// config
	jsonSize, err := needU64(config, "json_size", "config")
	if err != nil {
		return err
	}
	ksSize, err := needU64(config, "keyslots_size", "config")
	if err != nil {
		return err
	}
	if jsonSize != hdrSize-luks2BinSize {
		return corruptf("config json_size %d does not match metadata size %d", jsonSize, hdrSize)
	}
	if ksSize%luks2AreaAlign != 0 || ksSize > luks2MaxKeyslotsSize {
		return corruptf("keyslots_size %d", ksSize)
	}
	if minOffset != 0 && (minOffset < ksSize || minOffset-ksSize < 2*hdrSize) {
		return corruptf("keyslots_size %d does not fit before data offset %d", ksSize, minOffset)
	}
	// areas
	type area struct{ off, size uint64 }
	var areas []area
	end := 2*hdrSize + ksSize
	for _, k := range keyslots.keys {
		ks, _ := needObject(keyslots, k, "keyslots")
		a, err := needObject(ks, "area", "keyslot "+k)
		if err != nil {
			return err
		}
		if _, err := needString(a, "type", "keyslot "+k+" area"); err != nil {
			return err
		}
		off, err := needU64(a, "offset", "keyslot "+k+" area")
		if err != nil {
			return err
		}
		size, err := needU64(a, "size", "keyslot "+k+" area")
		if err != nil {
			return err
		}
		if off < 2*hdrSize || size == 0 || off > end || size > end-off {
			return corruptf("keyslot %s area [%d,+%d) outside the keyslots area", k, off, size)
		}
		areas = append(areas, area{off, size})
	}
	for i, a := range areas {
		for j, b := range areas {
			if i != j && a.off >= b.off && a.off < b.off+b.size {
				return corruptf("keyslot areas overlap")
			}
		}
	}
	// keyslot implementation checks for the luks2 type
	for _, k := range keyslots.keys {
		ks, _ := needObject(keyslots, k, "keyslots")
		if typ, _ := needString(ks, "type", ""); typ != "luks2" {
			continue
		}
		if err := validateLUKS2Keyslot(ks, k); err != nil {
			return err
		}
	}
	return nil
}

func isBackupSegment(s *object) bool {
	raw, ok := s.get("flags")
	if !ok {
		return false
	}
	flags, _ := stringArray(raw)
	for _, f := range flags {
		if len(f) >= 7 && f[:7] == "backup-" {
			return true
		}
	}
	return false
}

func validateLUKS2Keyslot(ks *object, k string) error {
	what := "keyslot " + k
	kdf, err := needObject(ks, "kdf", what)
	if err != nil {
		return err
	}
	af, err := needObject(ks, "af", what)
	if err != nil {
		return err
	}
	area, err := needObject(ks, "area", what)
	if err != nil {
		return err
	}
	typ, err := needString(kdf, "type", what+" kdf")
	if err != nil {
		return err
	}
	switch typ {
	case KDFPBKDF2:
		if kdf.len() != 4 {
			return corruptf("%s pbkdf2 kdf must have exactly type, hash, iterations, salt", what)
		}
		if _, err := needString(kdf, "hash", what+" kdf"); err != nil {
			return err
		}
		if _, err := needU32(kdf, "iterations", what+" kdf"); err != nil {
			return err
		}
	case KDFArgon2i, KDFArgon2id:
		if kdf.len() != 5 {
			return corruptf("%s argon2 kdf must have exactly type, time, memory, cpus, salt", what)
		}
		for _, f := range []string{"time", "memory", "cpus"} {
			if _, err := needU32(kdf, f, what+" kdf"); err != nil {
				return err
			}
		}
	}
	if _, err := needString(kdf, "salt", what+" kdf"); err != nil {
		return err
	}
	if t, err := needString(af, "type", what+" af"); err != nil {
		return err
	} else if t != "luks1" {
		return corruptf("%s af type %q", what, t)
	}
	if _, err := needString(af, "hash", what+" af"); err != nil {
		return err
	}
	if _, err := needU32(af, "stripes", what+" af"); err != nil {
		return err
	}
	if t, err := needString(area, "type", what+" area"); err != nil {
		return err
	} else if t != "raw" {
		return corruptf("%s area type %q", what, t)
	}
	if _, err := needString(area, "encryption", what+" area"); err != nil {
		return err
	}
	if _, err := needU32(area, "key_size", what+" area"); err != nil {
		return err
	}
	return nil
}

// ---- typed views ----

func (l *luks2) sec(name string) *object {
	o, err := section(l.root, name)
	if err != nil {
		// The root was validated on read and is only changed through
		// setSec, so every section exists and parses.
		return newObject()
	}
	return o
}

func (l *luks2) setSec(name string, o *object) { l.root.setObject(name, o) }

func (l *luks2) keyslotsSize() (uint64, error) {
	return needU64(l.sec("config"), "keyslots_size", "config")
}

type segment2 struct {
	id         int
	typ        string
	offset     uint64
	encryption string
	sectorSize int
}

// dataSegment returns the default (first regular crypt) segment.
func (l *luks2) dataSegment() (*segment2, error) {
	segs := l.sec("segments")
	ids, err := segs.numericKeys()
	if err != nil {
		return nil, corruptf("segments: %v", err)
	}
	for _, id := range ids {
		s, err := segs.getObject(strconv.Itoa(id))
		if err != nil || s == nil || isBackupSegment(s) {
			continue
		}
		typ, _ := needString(s, "type", "segment")
		if typ != "crypt" {
			return nil, fmt.Errorf("segment %d type %q: %w", id, typ, ErrUnsupported)
		}
		off, _ := needU64(s, "offset", "segment")
		enc, _ := needString(s, "encryption", "segment")
		ss, _ := needU32(s, "sector_size", "segment")
		return &segment2{id: id, typ: typ, offset: off, encryption: enc, sectorSize: int(ss)}, nil
	}
	return nil, corruptf("no data segment")
}

type digest2 struct {
	id         int
	typ        string
	keyslots   []int
	segments   []int
	hash       string
	iterations uint32
	salt       []byte
	digest     []byte
}

func (l *luks2) digests() ([]*digest2, error) {
	ds := l.sec("digests")
	ks := l.sec("keyslots")
	segs := l.sec("segments")
	ids, err := ds.numericKeys()
	if err != nil {
		return nil, corruptf("digests: %v", err)
	}
	var out []*digest2
	for _, id := range ids {
		k := strconv.Itoa(id)
		o, err := ds.getObject(k)
		if err != nil || o == nil {
			return nil, corruptf("digest %s", k)
		}
		d := &digest2{id: id}
		d.typ, _ = needString(o, "type", "digest")
		if d.keyslots, err = refArray(o, "keyslots", "digest "+k, ks); err != nil {
			return nil, err
		}
		if d.segments, err = refArray(o, "segments", "digest "+k, segs); err != nil {
			return nil, err
		}
		if d.typ == "pbkdf2" {
			if d.hash, err = needString(o, "hash", "digest "+k); err != nil {
				return nil, err
			}
			if d.iterations, err = needU32(o, "iterations", "digest "+k); err != nil {
				return nil, err
			}
			if d.salt, err = b64Field(o, "salt", "digest "+k); err != nil {
				return nil, err
			}
			if d.digest, err = b64Field(o, "digest", "digest "+k); err != nil {
				return nil, err
			}
		}
		out = append(out, d)
	}
	return out, nil
}

func b64Field(o *object, key, what string) ([]byte, error) {
	s, err := needString(o, key, what)
	if err != nil {
		return nil, err
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, corruptf("%s %q is not base64", what, key)
	}
	return b, nil
}

// verify checks key against a pbkdf2 digest.
func (d *digest2) verify(key []byte) (bool, error) {
	if d.typ != "pbkdf2" {
		return false, fmt.Errorf("digest %d type %q: %w", d.id, d.typ, ErrUnsupported)
	}
	h, err := hashByName(d.hash)
	if err != nil {
		return false, err
	}
	if len(d.salt) != saltSize || d.iterations == 0 {
		return false, corruptf("digest %d salt/iterations", d.id)
	}
	if n := len(d.digest); n < 20 || n > 64 || (n != 20 && n != h().Size()) {
		return false, corruptf("digest %d length %d", d.id, n)
	}
	got := pbkdf2.Key(key, d.salt, int(d.iterations), len(d.digest), h)
	defer wipe(got)
	return subtle.ConstantTimeCompare(got, d.digest) == 1, nil
}

func (l *luks2) digestOfKeyslot(id int) (*digest2, error) {
	ds, err := l.digests()
	if err != nil {
		return nil, err
	}
	for _, d := range ds {
		if slices.Contains(d.keyslots, id) {
			return d, nil
		}
	}
	return nil, fmt.Errorf("keyslot %d has no digest: %w", id, ErrNoKeyslot)
}

func (l *luks2) segmentDigest() (*digest2, *segment2, error) {
	seg, err := l.dataSegment()
	if err != nil {
		return nil, nil, err
	}
	ds, err := l.digests()
	if err != nil {
		return nil, nil, err
	}
	for _, d := range ds {
		if slices.Contains(d.segments, seg.id) {
			return d, seg, nil
		}
	}
	return nil, seg, corruptf("data segment has no digest")
}

type keyslot2 struct {
	id          int
	typ         string
	keySize     int
	afHash      string
	stripes     uint32
	areaOffset  uint64
	areaSize    uint64
	areaEnc     string
	areaKeySize int
	kdf         kdfParams
	salt        []byte
	priority    int
}

func (l *luks2) keyslot(id int) (*keyslot2, error) {
	o, err := l.sec("keyslots").getObject(strconv.Itoa(id))
	if err != nil {
		return nil, corruptf("keyslot %d: %v", id, err)
	}
	if o == nil {
		return nil, fmt.Errorf("keyslot %d is not active: %w", id, ErrNoKeyslot)
	}
	what := fmt.Sprintf("keyslot %d", id)
	k := &keyslot2{id: id, priority: 1}
	k.typ, _ = needString(o, "type", what)
	ksz, _ := needU32(o, "key_size", what)
	k.keySize = int(ksz)
	if raw, ok := o.get("priority"); ok {
		p, ok := jsonUint32(raw)
		if !ok || p > 2 {
			return nil, corruptf("%s priority", what)
		}
		k.priority = int(p)
	}
	if k.typ != "luks2" {
		return k, nil
	}
	af, _ := needObject(o, "af", what)
	area, _ := needObject(o, "area", what)
	kdf, _ := needObject(o, "kdf", what)
	if af == nil || area == nil || kdf == nil {
		return nil, corruptf("%s lacks af, area or kdf", what)
	}
	k.afHash, _ = needString(af, "hash", what)
	k.stripes, _ = needU32(af, "stripes", what)
	k.areaOffset, _ = needU64(area, "offset", what)
	k.areaSize, _ = needU64(area, "size", what)
	k.areaEnc, _ = needString(area, "encryption", what)
	aks, _ := needU32(area, "key_size", what)
	k.areaKeySize = int(aks)
	k.kdf.typ, _ = needString(kdf, "type", what)
	if k.kdf.typ == KDFPBKDF2 {
		k.kdf.hash, _ = needString(kdf, "hash", what)
		k.kdf.iterations, _ = needU32(kdf, "iterations", what)
	} else {
		k.kdf.iterations, _ = needU32(kdf, "time", what)
		k.kdf.memory, _ = needU32(kdf, "memory", what)
		k.kdf.parallel, _ = needU32(kdf, "cpus", what)
	}
	salt, err := b64Field(kdf, "salt", what+" kdf")
	if err != nil {
		return nil, err
	}
	k.salt = salt
	return k, nil
}

// openKeyslot derives the keyslot key, decrypts and merges the stored key.
// It does not verify the digest.
func (l *luks2) openKeyslot(k *keyslot2, pass []byte) ([]byte, error) {
	if k.typ != "luks2" {
		return nil, fmt.Errorf("keyslot %d type %q: %w", k.id, k.typ, ErrUnsupported)
	}
	if k.stripes != luksStripes {
		return nil, fmt.Errorf("keyslot %d with %d AF stripes: %w", k.id, k.stripes, ErrUnsupported)
	}
	if len(k.salt) != saltSize {
		return nil, corruptf("keyslot %d salt length %d", k.id, len(k.salt))
	}
	if k.keySize <= 0 || k.keySize > MaxVolumeKeySize {
		return nil, fmt.Errorf("keyslot %d key size %d: %w", k.id, k.keySize, ErrUnsupported)
	}
	cs, err := parseCipher(k.areaEnc)
	if err != nil {
		return nil, fmt.Errorf("keyslot %d: %w", k.id, err)
	}
	if err := cs.checkKeySize(k.areaKeySize); err != nil {
		return nil, fmt.Errorf("keyslot %d: %w", k.id, err)
	}
	n := uint64(afSectors(k.keySize, luksStripes) * sectorSize)
	if n > k.areaSize {
		return nil, corruptf("keyslot %d area %d bytes is smaller than its key material %d", k.id, k.areaSize, n)
	}
	start := k.areaOffset - 2*l.hdrSize
	if start+n > uint64(len(l.area)) {
		return nil, corruptf("keyslot %d area beyond the keyslots area", k.id)
	}
	dk, err := k.kdf.derive(pass, k.salt, k.areaKeySize)
	if err != nil {
		return nil, fmt.Errorf("keyslot %d: %w", k.id, err)
	}
	sc, err := newSectorCrypter(cs, dk)
	wipe(dk)
	if err != nil {
		return nil, err
	}
	mat := make([]byte, n)
	copy(mat, l.area[start:start+n])
	defer wipe(mat)
	sc.decrypt(mat)
	return afMerge(mat, k.keySize, luksStripes, k.afHash)
}

// activeKeyslots returns the keyslot ids in ascending order.
func (l *luks2) activeKeyslots() []int {
	ids, _ := l.sec("keyslots").numericKeys()
	return ids
}

// freeID returns the lowest id in [0,max) that is not a key of o.
func freeID(o *object, maxID int) (int, bool) {
	for i := 0; i < maxID; i++ {
		if _, ok := o.get(strconv.Itoa(i)); !ok {
			return i, true
		}
	}
	return 0, false
}

// findAreaGap returns the first 4 KiB-aligned gap of length bytes in the
// keyslots area, as cryptsetup's LUKS2_find_area_gap does.
func (l *luks2) findAreaGap(length uint64) (uint64, error) {
	ksz, err := l.keyslotsSize()
	if err != nil {
		return 0, err
	}
	type iv struct{ off, size uint64 }
	var used []iv
	for _, id := range l.activeKeyslots() {
		o, _ := l.sec("keyslots").getObject(strconv.Itoa(id))
		a, _ := needObject(o, "area", "keyslot")
		if a == nil {
			continue
		}
		off, _ := needU64(a, "offset", "area")
		size, _ := needU64(a, "size", "area")
		used = append(used, iv{off, size})
	}
	slices.SortFunc(used, func(a, b iv) int {
		switch {
		case a.off < b.off:
			return -1
		case a.off > b.off:
			return 1
		}
		return 0
	})
	off := 2 * l.hdrSize
	for _, u := range used {
		if off+length <= u.off {
			break
		}
		if u.off+u.size > off {
			off = alignUp(u.off+u.size, luks2AreaAlign)
		}
	}
	if off+length > 2*l.hdrSize+ksz {
		return 0, fmt.Errorf("no room for a %d-byte keyslot area in the %d-byte keyslots area: %w", length, ksz, ErrNoSpace)
	}
	return off, nil
}

func alignUp(n, a uint64) uint64 { return (n + a - 1) / a * a }

// jsonText serialises the metadata and checks it fits the JSON area.
func (l *luks2) jsonText() ([]byte, error) {
	text := l.root.marshal()
	if uint64(len(text)) > l.hdrSize-luks2BinSize-1 {
		return nil, fmt.Errorf("JSON metadata is %d bytes, the area holds %d: %w", len(text), l.hdrSize-luks2BinSize-1, ErrNoSpace)
	}
	return text, nil
}

// metadataCopy returns one complete metadata copy (binary header with
// checksum + JSON area) for the current state and sequence id.
func (l *luks2) metadataCopy(secondary bool) ([]byte, error) {
	text, err := l.jsonText()
	if err != nil {
		return nil, err
	}
	idx := 0
	var off uint64
	if secondary {
		idx, off = 1, l.hdrSize
	}
	b := make([]byte, l.hdrSize)
	copy(b, encodeBin2(bin2{hdrSize: l.hdrSize, seqid: l.seqid, hdrOffset: off, label: l.label,
		csumAlg: l.csumAlg, uuid: l.uuid, sub: l.subsystem, salt: l.salt[idx]}, secondary))
	copy(b[luks2BinSize:], text)
	sum, err := checksum2(l.csumAlg, b[:luks2BinSize], b[luks2BinSize:])
	if err != nil {
		return nil, err
	}
	copy(b[offCsum:], sum)
	return b, nil
}

// jsonRaw is a helper to build small JSON values.
func jsonRaw(v any) json.RawMessage {
	b, err := marshalNoEscape(v)
	if err != nil {
		panic(err) // only called with strings, ints and string slices
	}
	return b
}
