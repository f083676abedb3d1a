package luks

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"
)

func TestVolumeKeyNeverPrinted(t *testing.T) {
	vk := NewVolumeKeyFromBytes(bytes.Repeat([]byte{0xab}, 32))
	hexKey := hex.EncodeToString(vk.Bytes())
	type holder struct {
		k   *VolumeKey
		V   VolumeKey
		P   *VolumeKey
		raw VolumeKey
	}
	hd := holder{k: vk, V: *vk, P: vk, raw: *vk}
	outs := []string{
		fmt.Sprint(vk), fmt.Sprint(*vk), fmt.Sprintf("%v %+v %#v %s %x %X %q %d", vk, vk, vk, vk, vk, vk, vk, vk),
		fmt.Sprintf("%v %+v %#v %x", *vk, *vk, *vk, *vk), fmt.Sprintf("%v %+v %#v", hd, hd, hd),
		vk.String(), vk.GoString(),
	}
	for _, o := range outs {
		if strings.Contains(strings.ToLower(o), "abababab") || strings.Contains(o, "171 171") {
			t.Fatalf("key material printed: %s", o)
		}
	}
	if !strings.Contains(outs[0], "redacted") {
		t.Fatalf("no redaction marker: %s", outs[0])
	}
	if _, err := json.Marshal(hd); err == nil {
		t.Fatal("json.Marshal of a VolumeKey succeeded")
	}
	if got := string(vk.AppendHex([]byte("k="))); got != "k="+hexKey {
		t.Fatalf("AppendHex %q", got)
	}
	c := vk.Clone()
	vk.Wipe()
	if vk.Len() != 0 || vk.Bytes() != nil || c.Len() != 32 || c.Equal(vk) {
		t.Fatal("Wipe/Clone/Equal")
	}
	vk.Wipe() // idempotent
	var nilKey *VolumeKey
	nilKey.Wipe()
	if nilKey.Len() != 0 {
		t.Fatal("nil key length")
	}
	if _, err := NewVolumeKey(0); !errors.Is(err, ErrInvalidArgument) {
		t.Fatal("zero-size key accepted")
	}
}

func TestErrorsCarryNoKeyMaterial(t *testing.T) {
	vk := NewVolumeKeyFromBytes(bytes.Repeat([]byte{0x5a}, 64))
	h, err := Create(Options{PBKDF: testPBKDF2, HeaderSize: 1 << 20}, vk, []byte("secret-passphrase"))
	if err != nil {
		t.Fatal(err)
	}
	var errs []error
	_, _, e := h.Unlock([]byte("secret-passphrase-wrong"))
	errs = append(errs, e)
	other := NewVolumeKeyFromBytes(bytes.Repeat([]byte{0x5b}, 64))
	_, e = h.AddKeyslot(other, []byte("secret-passphrase"), testPBKDF2)
	errs = append(errs, e, h.VerifyVolumeKey(other))
	_, e = Create(Options{Cipher: "aes-xts-plain64"}, NewVolumeKeyFromBytes(bytes.Repeat([]byte{0x5a}, 16)), []byte("secret-passphrase"))
	errs = append(errs, e)
	for _, e := range errs {
		if e == nil {
			t.Fatal("expected an error")
		}
		s := e.Error()
		if strings.Contains(s, "secret") || strings.Contains(strings.ToLower(s), "5a5a") || strings.Contains(s, "ZZZZ") {
			t.Fatalf("error leaks material: %s", s)
		}
	}
	if !errors.Is(errs[0], ErrWrongPassphrase) || !errors.Is(errs[1], ErrWrongKey) || !errors.Is(errs[2], ErrWrongKey) || !errors.Is(errs[3], ErrInvalidArgument) {
		t.Fatalf("error kinds: %v", errs)
	}
}

func TestAFRoundTrip(t *testing.T) {
	for _, hash := range SupportedHashes() {
		for _, n := range []int{16, 24, 32, 33, 64, 100} {
			key := randBytes(t, n)
			mat, err := afSplit(key, luksStripes, hash)
			if err != nil {
				t.Fatal(err)
			}
			if len(mat) != afSectors(n, luksStripes)*512 {
				t.Fatalf("material %d bytes", len(mat))
			}
			got, err := afMerge(mat, n, luksStripes, hash)
			if err != nil || !bytes.Equal(got, key) {
				t.Fatalf("%s/%d: merge mismatch", hash, n)
			}
			mat[7] ^= 1
			if got, _ := afMerge(mat, n, luksStripes, hash); bytes.Equal(got, key) {
				t.Fatalf("%s/%d: damaged material still merges", hash, n)
			}
		}
	}
	if _, err := afSplit([]byte{1}, 4, "md5"); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("unknown hash: %v", err)
	}
}

func TestCipherSpecs(t *testing.T) {
	for _, spec := range SupportedCiphers() {
		cs, err := parseCipher(spec)
		if err != nil || cs.String() != spec {
			t.Fatalf("%s: %v %s", spec, err, cs)
		}
		size := 32
		sc, err := newSectorCrypter(cs, randBytes(t, size))
		if err != nil {
			t.Fatal(err)
		}
		plain := randBytes(t, 4*512)
		buf := append([]byte{}, plain...)
		sc.encrypt(buf)
		if bytes.Equal(buf[:512], plain[:512]) || bytes.Equal(buf[512:1024], buf[:512]) {
			t.Fatalf("%s: encryption is not per sector", spec)
		}
		sc.decrypt(buf)
		if !bytes.Equal(buf, plain) {
			t.Fatalf("%s: round trip", spec)
		}
	}
	for _, bad := range []string{"camellia-xts-plain64", "aes-ecb", "aes", "aes-xts-essiv:sha256", "aes-cbc-benbi", "aes-gcm-random"} {
		if _, err := parseCipher(bad); err == nil {
			t.Fatalf("%s accepted", bad)
		}
	}
	if ValidateCipher("aes-xts-plain64", 64) != nil || ValidateCipher("aes-xts-plain64", 16) == nil || ValidateCipher("camellia-xts-plain64", 64) == nil || ValidateCipher("twofish-xts-plain64", 64) != nil {
		t.Fatal("ValidateCipher")
	}
	if DefaultKeySize("aes-xts-plain64") != 64 || DefaultKeySize("aes-cbc-essiv:sha256") != 32 {
		t.Fatal("DefaultKeySize")
	}
	xts, _ := parseCipher("aes-xts-plain64")
	if xts.checkKeySize(16) == nil || xts.checkKeySize(64) != nil {
		t.Fatal("xts key sizes")
	}
}

func TestCheckSectorSize(t *testing.T) {
	vk, _ := NewVolumeKey(64)
	h, err := Create(Options{PBKDF: testPBKDF2, SectorSize: 4096, HeaderSize: 1 << 20}, vk, []byte("p"))
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckSectorSize(h, 4096); err != nil {
		t.Fatal(err)
	}
	err = CheckSectorSize(h, 512)
	if !errors.Is(err, ErrSectorSize) || !strings.Contains(err.Error(), "4096") || !strings.Contains(err.Error(), "512") {
		t.Fatalf("mismatch: %v", err)
	}
	l1, _ := Create(Options{Version: 1, PBKDF: testPBKDF2}, vk, []byte("p"))
	if err := CheckSectorSize(l1, 4096); !errors.Is(err, ErrSectorSize) || !strings.Contains(err.Error(), "LUKS2") {
		t.Fatalf("LUKS1 on 4K: %v", err)
	}
	if _, err := Create(Options{Version: 1, SectorSize: 4096, PBKDF: testPBKDF2}, vk, []byte("p")); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("LUKS1 with 4096 sectors: %v", err)
	}
	for _, ss := range []int{256, 768, 8192} {
		if _, err := Create(Options{SectorSize: ss, PBKDF: testPBKDF2}, vk, []byte("p")); !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("sector size %d: %v", ss, err)
		}
	}
}

func TestCreateOptionChecks(t *testing.T) {
	vk, _ := NewVolumeKey(64)
	bad := []Options{
		{Version: 3},
		{Cipher: "aes-cbc-essiv:sha256"}, // 64-byte key too long for CBC
		{HeaderSize: 1<<20 + 512},        // not 4 KiB aligned
		{HeaderSize: 1 << 20, MetadataSize: 12288},
		{HeaderSize: 1 << 20, KeyslotsSize: 4096},
		{UUID: "not-a-uuid"},
		{Label: strings.Repeat("l", 48)},
		{Hash: "md5"},
		{Version: 1, PBKDF: PBKDF{Type: KDFArgon2id}},
		{Version: 1, Label: "x"},
		{PBKDF: PBKDF{Type: KDFPBKDF2, Iterations: 999}},
		{PBKDF: PBKDF{Type: KDFArgon2id, Iterations: 3, MemoryKiB: 32768}},
		{PBKDF: PBKDF{Type: KDFArgon2id, Iterations: 4, MemoryKiB: 16}},
		{PBKDF: PBKDF{Type: KDFArgon2id, Iterations: 4, MemoryKiB: 32768, Parallel: 5}},
		{PBKDF: PBKDF{Type: KDFPBKDF2, Iterations: 1000, MemoryKiB: 32}},
		{PBKDF: PBKDF{Type: "scrypt"}},
	}
	for i, o := range bad {
		if _, err := Create(o, vk, []byte("p")); err == nil {
			t.Errorf("case %d (%+v) accepted", i, o)
		}
	}
	h, err := Create(Options{PBKDF: testArgon2id, UUID: "0B1C2D3E-4F50-4617-8829-3A4B5C6D7E8F", Label: "l", Subsystem: "s",
		HeaderSize: 8 << 20, KeyslotsSize: 1 << 20}, vk, []byte("p"))
	if err != nil {
		t.Fatal(err)
	}
	if h.UUID() != "0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f" || h.KeyslotsSize() != 1<<20 || h.DataOffset() != 8<<20 || h.HeaderSize() != 8<<20 {
		t.Fatalf("uuid %s keyslots %d offset %d", h.UUID(), h.KeyslotsSize(), h.DataOffset())
	}
	k := h.Keyslots()[0]
	if k.PBKDF.Type != KDFArgon2id || k.PBKDF.Iterations != 4 || k.PBKDF.MemoryKiB != 32768 || k.PBKDF.Parallel < 1 || k.Cipher != DefaultCipher || k.AFHash != "sha256" {
		t.Fatalf("keyslot %+v", k)
	}
}

// TestPBKDFBenchmark runs the (cheap) benchmark with a short target.
func TestPBKDFBenchmark(t *testing.T) {
	start := time.Now()
	k, err := PBKDF{Type: KDFPBKDF2, IterTime: 50 * time.Millisecond}.resolve(false, 64)
	if err != nil || k.iterations < MinPBKDF2Iterations || k.hash != "sha256" {
		t.Fatalf("pbkdf2 bench: %+v %v", k, err)
	}
	a, err := PBKDF{Type: KDFArgon2id, MemoryKiB: 65536, IterTime: 100 * time.Millisecond}.resolve(false, 64)
	if err != nil || a.iterations < MinArgon2Time || a.memory < MinArgon2Memory || a.memory > 65536 {
		t.Fatalf("argon2 bench: %+v %v", a, err)
	}
	// A target far below four passes over the requested memory lowers
	// the memory, as cryptsetup does, instead of the time cost.
	b, err := PBKDF{Type: KDFArgon2i, MemoryKiB: 1 << 20, IterTime: 20 * time.Millisecond}.resolve(false, 64)
	if err != nil || b.iterations != MinArgon2Time || b.memory >= 1<<20 {
		t.Fatalf("argon2 small target: %+v %v", b, err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("benchmarks took %v", el)
	}
	// Derivation with the benchmarked pbkdf2 count takes roughly the target.
	st := time.Now()
	if _, err := k.derive([]byte("p"), make([]byte, 32), 64); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(st); el < 10*time.Millisecond || el > 2*time.Second {
		t.Logf("pbkdf2 derivation with %d iterations took %v (target 50ms)", k.iterations, el)
	}
	if digestIterations(PBKDF{Iterations: 4}, "sha256", 64) != MinPBKDF2Iterations {
		t.Fatal("forced iterations must give the minimum digest count")
	}
}

func TestReadKeyRules(t *testing.T) {
	cases := []struct {
		name           string
		in             string
		regular        bool
		off, size, max int64
		eol            bool
		want           string
		errWant        bool
	}{
		{"file whole, newlines kept", "ab\ncd\n", true, 0, 0, 0, false, "ab\ncd\n", false},
		{"file offset+size", "0123456789", true, 2, 5, 0, false, "23456", false},
		{"file short for size", "0123", true, 0, 5, 0, false, "", true},
		{"file offset beyond end", "0123", true, 5, 0, 0, false, "", true},
		{"file exactly max", "abcd", true, 0, 0, 4, false, "abcd", false},
		{"file over max", "abcde", true, 0, 0, 4, false, "", true},
		{"empty regular file", "", true, 0, 0, 0, false, "", false},
		{"pipe empty", "", false, 0, 0, 0, false, "", true},
		{"passphrase stops at newline", "secret\nrest", false, 0, 0, 0, true, "secret", false},
		{"passphrase no newline", "secret", false, 0, 0, 0, true, "secret", false},
		{"passphrase empty line", "\n", false, 0, 0, 0, true, "", false},
		{"passphrase offset", "xxsecret\n", false, 2, 0, 0, true, "secret", false},
		{"passphrase with size, newline first", "ab\ncd", false, 0, 4, 0, true, "", true},
		{"pipe binary", "a\x00b\nc", false, 0, 0, 0, false, "a\x00b\nc", false},
	}
	for _, tc := range cases {
		size := int64(-1)
		if tc.regular {
			size = int64(len(tc.in))
		}
		got, err := readKeyStream(strings.NewReader(tc.in), size, tc.off, tc.size, tc.max, tc.eol)
		if tc.errWant {
			if !errors.Is(err, ErrKeyInput) {
				t.Errorf("%s: err %v, want ErrKeyInput", tc.name, err)
			}
			continue
		}
		if err != nil || string(got) != tc.want {
			t.Errorf("%s: got %q, %v; want %q", tc.name, got, err, tc.want)
		}
	}
	// Through ReadKey: a key file path, and "-" / "" on a pipe.
	kf := writeTemp(t, "kf", []byte("k\ney\n"))
	if got, err := ReadKey(KeySource{KeyFile: kf}); err != nil || string(got) != "k\ney\n" {
		t.Fatalf("key file: %q %v", got, err)
	}
	for _, mode := range []string{"-", ""} {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		go func() { io.WriteString(w, "line1\nline2\n"); w.Close() }()
		got, err := ReadKey(KeySource{KeyFile: mode, Stdin: r})
		r.Close()
		want := "line1\nline2\n"
		if mode == "" {
			want = "line1"
		}
		if err != nil || string(got) != want {
			t.Fatalf("stdin mode %q: %q %v", mode, got, err)
		}
	}
	if _, err := ReadKey(KeySource{KeyFile: "/nonexistent/key"}); !errors.Is(err, ErrKeyInput) {
		t.Fatalf("missing key file: %v", err)
	}
}

func TestTokens(t *testing.T) {
	vk, _ := NewVolumeKey(32)
	h, err := Create(Options{PBKDF: testPBKDF2, HeaderSize: 1 << 20}, vk, []byte("p"))
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{`[]`, `{"keyslots":[]}`, `{"type":"","keyslots":[]}`, `{"type":"x"}`, `{"type":"x","keyslots":["7"]}`, `{"type":"x","keyslots":[0]}`, `{`} {
		if _, err := h.SetToken(-1, []byte(bad)); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("token %s: %v", bad, err)
		}
	}
	raw := `{"type":"x-test","keyslots":["0"],"html":"<a&b>","u":"\u00e9\/","big":1e400}`
	id, err := h.SetToken(-1, []byte(raw))
	if err != nil || id != 0 {
		t.Fatalf("SetToken: %d %v", id, err)
	}
	got, _ := h.Token(0)
	if string(got) != `{"type":"x-test","keyslots":["0"],"html":"<a&b>","u":"\u00e9\/","big":1e400}` {
		t.Fatalf("token text changed: %s", got)
	}
	if err := h.SetCheckpoint([]byte{0, 1, 2}); err != nil {
		t.Fatal(err)
	}
	if ids := h.TokenIDs(); len(ids) != 2 || ids[1] != 1 {
		t.Fatalf("token ids %v", ids)
	}
	if err := h.SetCheckpoint([]byte("again")); err != nil {
		t.Fatal(err)
	}
	if ids := h.TokenIDs(); len(ids) != 2 {
		t.Fatalf("SetCheckpoint added a second token: %v", ids)
	}
	// A checkpoint too large for the JSON area is refused and leaves the
	// header unchanged.
	if err := h.SetCheckpoint(make([]byte, 16<<10)); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("huge checkpoint: %v", err)
	}
	if cp, _ := h.Checkpoint(); string(cp) != "again" {
		t.Fatalf("checkpoint after refused update: %q", cp)
	}
	img, _ := h.Image()
	back, err := Read(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	if got2, _ := back.Token(0); !bytes.Equal(got2, got) {
		t.Fatalf("token after round trip: %s", got2)
	}
	if err := back.RemoveToken(0); err != nil {
		t.Fatal(err)
	}
	if _, ok := back.Token(0); ok {
		t.Fatal("token 0 still there")
	}
	// Requirements round trip, idempotent set, clean clear.
	for i := 0; i < 2; i++ {
		if err := back.SetRequirement(RequirementDmconvert); err != nil {
			t.Fatal(err)
		}
	}
	if r := back.Requirements(); len(r) != 1 {
		t.Fatalf("requirements %v", r)
	}
	if err := back.ClearRequirement(RequirementDmconvert); err != nil {
		t.Fatal(err)
	}
	if _, ok := back.v2.sec("config").get("requirements"); ok {
		t.Fatal("empty requirements object left behind")
	}
}

// A LUKS2 header for a segment cipher other than AES keeps the cipher in
// its segment; its keyslot is encrypted with cryptsetup's fallback,
// AES-XTS with a 512-bit key (every cryptsetup opens it; Serpent and
// Twofish need the kernel's AF_ALG there), and opens. LUKS1 (one cipher
// for the data and the keyslots) takes Serpent and Twofish, which this
// package runs, and refuses a cipher it does not run (Camellia).
func TestCreateOtherSegmentCipher(t *testing.T) {
	vk := NewVolumeKeyFromBytes(bytes.Repeat([]byte{7}, 64))
	defer vk.Wipe()
	kdf := PBKDF{Type: KDFPBKDF2, Iterations: MinPBKDF2Iterations}
	for _, c := range []string{"serpent-xts-plain64", "twofish-xts-plain64"} {
		h, err := Create(Options{Version: 2, Cipher: c, PBKDF: kdf}, vk, []byte("pw"))
		if err != nil {
			t.Fatalf("%s: %v", c, err)
		}
		if got := h.Cipher(); got != c {
			t.Errorf("%s: segment cipher %q", c, got)
		}
		ks := h.Keyslots()
		if len(ks) != 1 || ks[0].Cipher != FallbackKeyslotCipher || ks[0].AreaKey != FallbackKeyslotKeySize {
			t.Fatalf("%s: keyslots %+v, want one with the fallback area encryption", c, ks)
		}
		img, err := h.Image()
		if err != nil {
			t.Fatal(err)
		}
		h2, err := Read(bytes.NewReader(img))
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := h2.Unlock([]byte("pw"))
		if err != nil || !bytes.Equal(got.Bytes(), vk.Bytes()) {
			t.Fatalf("%s: the header read back does not open to the key: %v", c, err)
		}
		got.Wipe()
		h1, err := Create(Options{Version: 1, Cipher: c, PBKDF: kdf}, vk, []byte("pw"))
		if err != nil {
			t.Fatalf("LUKS1 with %s: %v", c, err)
		}
		if got, _, err := reread(t, h1).Unlock([]byte("pw")); err != nil || !bytes.Equal(got.Bytes(), vk.Bytes()) {
			t.Fatalf("LUKS1 with %s read back does not open to the key: %v", c, err)
		}
	}
	if _, err := Create(Options{Version: 1, Cipher: "camellia-xts-plain64", PBKDF: kdf}, vk, []byte("pw")); !errors.Is(err, ErrUnsupported) {
		t.Errorf("LUKS1 with camellia-xts-plain64: %v, want ErrUnsupported", err)
	}
	if _, err := Create(Options{Version: 2, Cipher: "serpent", PBKDF: kdf}, vk, []byte("pw")); err == nil {
		t.Error("a cipher without mode was accepted")
	}
}
