package luks

import (
	"bytes"
	"errors"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestOursToCryptsetup creates headers with our code and checks that
// stock cryptsetup dumps them, opens them with the passphrase (stdin,
// newline-terminated) and with a binary key file (offset and size), and
// recovers exactly the volume key we chose.
func TestOursToCryptsetup(t *testing.T) {
	cs := needCryptsetup(t)
	cases := []struct {
		name    string
		keySize int
		o       Options
	}{
		{"luks2-argon2id-default16M-512", 64, Options{PBKDF: testArgon2id}},
		{"luks2-argon2id-min-4096", 64, Options{PBKDF: testArgon2id, SectorSize: 4096, HeaderSize: MinHeaderSize(2, 64, 0), Label: "min", Subsystem: "dmconvert-test"}},
		{"luks2-argon2i-min-512", 64, Options{PBKDF: testArgon2i, HeaderSize: MinHeaderSize(2, 64, 0)}},
		{"luks2-argon2i-1M-4096", 64, Options{PBKDF: testArgon2i, SectorSize: 4096, HeaderSize: 1 << 20}},
		{"luks2-pbkdf2-16M-4096", 64, Options{PBKDF: testPBKDF2, SectorSize: 4096, UUID: "0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f"}},
		{"luks2-pbkdf2-min256-512", 32, Options{PBKDF: testPBKDF2, HeaderSize: MinHeaderSize(2, 32, 0)}},
		{"luks2-essiv-sha512-md64k", 32, Options{Cipher: "aes-cbc-essiv:sha256", Hash: "sha512", MetadataSize: 64 << 10, HeaderSize: 4 << 20,
			PBKDF: PBKDF{Type: KDFPBKDF2, Hash: "sha512", Iterations: 1000}}},
		{"luks2-xtsplain-256-2048", 32, Options{Cipher: "aes-xts-plain", SectorSize: 2048, PBKDF: testArgon2id, HeaderSize: 2 << 20}},
		{"luks2-cbcplain64-128-sha1", 16, Options{Cipher: "aes-cbc-plain64", Hash: "sha1", PBKDF: PBKDF{Type: KDFPBKDF2, Hash: "sha1", Iterations: 1000}}},
		{"luks2-cbcplain-192", 24, Options{Cipher: "aes-cbc-plain", PBKDF: testPBKDF2, HeaderSize: 1 << 20}},
		{"luks1-xts512-sha256-default", 64, Options{Version: 1, PBKDF: testPBKDF2}},
		{"luks1-essiv256-sha1-min", 32, Options{Version: 1, Cipher: "aes-cbc-essiv:sha256", Hash: "sha1", PBKDF: testPBKDF2, HeaderSize: MinHeaderSize(1, 32, 0)}},
		{"luks1-xts256-sha512", 32, Options{Version: 1, Hash: "sha512", PBKDF: testPBKDF2, HeaderSize: 4 << 20}},
		// No forced iteration count: the benchmark picks the costs.
		{"luks2-argon2id-benchmarked", 64, Options{PBKDF: PBKDF{IterTime: 50 * time.Millisecond, MemoryKiB: 65536}, HeaderSize: 1 << 20}},
		{"luks1-pbkdf2-benchmarked", 64, Options{Version: 1, PBKDF: PBKDF{IterTime: 50 * time.Millisecond}}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cs := cs.in(t)
			vk, err := NewVolumeKey(tc.keySize)
			if err != nil {
				t.Fatal(err)
			}
			pass := []byte("pass-" + strconv.Itoa(i) + " with spaces")
			h, err := Create(tc.o, vk, pass)
			if err != nil {
				t.Fatalf("Create: %v", err)
			}
			kf := binaryKeyFile(t, 48)
			p := tc.o.PBKDF
			if tc.o.Version == 1 {
				p.Hash = ""
			}
			// The passphrase keyslot and the key-file keyslot share one
			// header, except for minimum-size headers, which hold a single
			// keyslot: there the key file gets a header of its own.
			kfHeader := h
			kfSlot, err := h.AddKeyslot(vk, kf, p)
			if errors.Is(err, ErrNoSpace) && tc.o.HeaderSize == MinHeaderSize(tc.o.Version, tc.keySize, 0) {
				if kfHeader, err = Create(tc.o, vk, kf); err != nil {
					t.Fatalf("Create with key file: %v", err)
				}
				kfSlot = 0
			} else if err != nil {
				t.Fatalf("AddKeyslot: %v", err)
			} else if kfSlot != 1 {
				t.Fatalf("second keyslot got id %d, want 1", kfSlot)
			}
			dev := writeImage(t, h)
			kfDev := dev
			if kfHeader != h {
				kfDev = writeImage(t, kfHeader)
			}

			wantVersion := 2
			if tc.o.Version == 1 {
				wantVersion = 1
			}
			checkDump(t, cs.ok(nil, "luksDump", dev), h, wantVersion)
			if kfDev != dev {
				checkDump(t, cs.ok(nil, "luksDump", kfDev), kfHeader, wantVersion)
			}

			// Passphrase on non-terminal stdin: cryptsetup stops at the
			// first newline, so trailing text after it is ignored.
			stdinPass := append(append([]byte{}, pass...), []byte("\nignored after newline")...)
			cs.ok(stdinPass, "open", "--test-passphrase", dev)
			cs.fails([]byte("wrong passphrase\n"), "open", "--test-passphrase", dev)

			// Binary key file with junk around it: offset and size select it.
			junked := append(append(randBytes(t, 7), kf...), randBytes(t, 5)...)
			kfPath := writeTemp(t, "keyfile", junked)
			cs.ok(nil, "open", "--test-passphrase", "--key-file", kfPath, "--keyfile-offset", "7", "--keyfile-size", "48", kfDev)
			// Read whole, the junk makes it a different key.
			cs.fails(nil, "open", "--test-passphrase", "--key-file", kfPath, kfDev)

			pwPath := writeTemp(t, "pw", pass)
			if got := cs.dumpVolumeKey(dev, pwPath); !bytes.Equal(got, vk.Bytes()) {
				t.Fatalf("cryptsetup recovered a different volume key")
			}
			if got := cs.dumpVolumeKey(kfDev, kfPath, "--keyfile-offset", "7", "--keyfile-size", "48"); !bytes.Equal(got, vk.Bytes()) {
				t.Fatalf("cryptsetup recovered a different volume key via the key file")
			}

			// And we read back what we wrote, with the same key input rules.
			back := readHeader(t, kfDev)
			key, err := ReadKey(KeySource{KeyFile: kfPath, KeyfileOffset: 7, KeyfileSize: 48})
			if err != nil {
				t.Fatal(err)
			}
			got, s, err := back.Unlock(key)
			if err != nil || s != kfSlot || !got.Equal(vk) {
				t.Fatalf("our unlock with key file: slot %d err %v equal %v", s, err, got.Equal(vk))
			}
			if _, _, err := back.Unlock([]byte("nope")); !errors.Is(err, ErrWrongPassphrase) {
				t.Fatalf("wrong passphrase: %v, want ErrWrongPassphrase", err)
			}
		})
	}
}

// writeImage writes h's image to a new device file with 1 MiB of data.
func writeImage(t testing.TB, h *Header) string {
	t.Helper()
	img, err := h.Image()
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(img)) != h.HeaderSize() {
		t.Fatalf("image %d bytes, HeaderSize %d", len(img), h.HeaderSize())
	}
	return deviceFile(t, img, 1<<20)
}

var dumpField = regexp.MustCompile(`(?m)^\s*([A-Za-z ]+):\s*(.*?)\s*$`)

// checkDump compares key facts of `cryptsetup luksDump` with our header.
func checkDump(t *testing.T, dump string, h *Header, version int) {
	t.Helper()
	fields := map[string][]string{}
	for _, m := range dumpField.FindAllStringSubmatch(dump, -1) {
		fields[m[1]] = append(fields[m[1]], m[2])
	}
	first := func(k string) string {
		if v := fields[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	if got := first("Version"); got != strconv.Itoa(version) {
		t.Errorf("luksDump Version %q, want %d", got, version)
	}
	if got := first("UUID"); got != h.UUID() {
		t.Errorf("luksDump UUID %q, want %q", got, h.UUID())
	}
	if version == 1 {
		if got := first("Cipher name") + "-" + first("Cipher mode"); got != h.Cipher() {
			t.Errorf("luksDump cipher %q, want %q", got, h.Cipher())
		}
		if got := first("Payload offset"); got != strconv.FormatInt(h.DataOffset()/512, 10) {
			t.Errorf("luksDump payload offset %q, want %d sectors", got, h.DataOffset()/512)
		}
		if got := first("MK bits"); got != strconv.Itoa(h.VolumeKeySize()*8) {
			t.Errorf("luksDump MK bits %q", got)
		}
		if n := strings.Count(dump, ": ENABLED"); n != len(h.Keyslots()) {
			t.Errorf("luksDump shows %d enabled keyslots, want %d", n, len(h.Keyslots()))
		}
		return
	}
	if got := first("cipher"); got != h.Cipher() {
		t.Errorf("luksDump segment cipher %q, want %q", got, h.Cipher())
	}
	if got := first("sector"); got != strconv.Itoa(h.SectorSize())+" [bytes]" {
		t.Errorf("luksDump sector %q, want %d", got, h.SectorSize())
	}
	if got := first("offset"); got != strconv.FormatInt(h.DataOffset(), 10)+" [bytes]" {
		t.Errorf("luksDump data offset %q, want %d", got, h.DataOffset())
	}
	if got := first("Metadata area"); got != strconv.FormatInt(h.MetadataSize(), 10)+" [bytes]" {
		t.Errorf("luksDump metadata area %q, want %d", got, h.MetadataSize())
	}
	if got := first("Keyslots area"); got != strconv.FormatInt(h.KeyslotsSize(), 10)+" [bytes]" {
		t.Errorf("luksDump keyslots area %q, want %d", got, h.KeyslotsSize())
	}
	wantLabel := h.Label()
	if wantLabel == "" {
		wantLabel = "(no label)"
	}
	if got := first("Label"); got != wantLabel {
		t.Errorf("luksDump label %q, want %q", got, wantLabel)
	}
	if n := len(fields["PBKDF"]); n != len(h.Keyslots()) {
		t.Errorf("luksDump shows %d keyslots, want %d", n, len(h.Keyslots()))
	}
	for i, k := range h.Keyslots() {
		if i < len(fields["PBKDF"]) && fields["PBKDF"][i] != k.PBKDF.Type {
			t.Errorf("luksDump PBKDF %q, want %q", fields["PBKDF"][i], k.PBKDF.Type)
		}
	}
}

// TestMinHeaderSizeMatchesCryptsetup records the experiment behind
// MinHeaderSize: cryptsetup accepts exactly this data offset and refuses
// one 4 KiB step less; Create behaves the same.
func TestMinHeaderSizeMatchesCryptsetup(t *testing.T) {
	cs := needCryptsetup(t)
	for _, keySize := range []int{64, 32} {
		min := MinHeaderSize(2, keySize, 0)
		pw := writeTemp(t, "pw", []byte("pw"))
		for _, off := range []int64{min, min - 4096} {
			dev := deviceFile(t, nil, 4<<20)
			_, err := runTool(t, nil, cs.path, "luksFormat", "--batch-mode", "--type", "luks2", "--key-size", strconv.Itoa(keySize*8),
				"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "512",
				"--offset", strconv.FormatInt(off/512, 10), "--key-file", pw, dev)
			vk, _ := NewVolumeKey(keySize)
			_, ourErr := Create(Options{HeaderSize: off, PBKDF: testPBKDF2}, vk, []byte("pw"))
			if off == min && (err != nil || ourErr != nil) {
				t.Errorf("%d-byte key, offset %d: cryptsetup err %v, ours %v; both should accept", keySize, off, err, ourErr)
			}
			if off < min && (err == nil || ourErr == nil) {
				t.Errorf("%d-byte key, offset %d: cryptsetup err %v, ours %v; both should refuse", keySize, off, err, ourErr)
			}
		}
	}
	if got := MinHeaderSize(2, 64, 0); got != 290816 {
		t.Errorf("MinHeaderSize(2, 64) = %d, want 290816", got)
	}
	if got := MinHeaderSize(1, 64, 0); got != 2068480 {
		t.Errorf("MinHeaderSize(1, 64) = %d, want 2068480", got)
	}
}

func TestMain(m *testing.M) {
	os.Exit(m.Run())
}
