package dmtable

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Lines as the kernel prints them (`dmsetup table --showkeys` without the
// trailing space dmsetup adds after an empty parameter list). Sources:
// /work/shared REPORT.md and FACTS.md (kernel 6.1 in the test VM), the
// kernel's Documentation/admin-guide/device-mapper/*.rst, and lines
// captured from the guest differential tests (guest_test.go), marked "6.1".
var kernelLines = []struct {
	line string
	typ  string
}{
	// REPORT.md: cryptsetup's online encrypt, LV restacked on pvfake.
	{"0 32768 linear 254:16 491520", "linear"},
	{"32768 425984 linear 254:16 32768", "linear"},
	{"0 311296 linear 253:2 2048", "linear"},
	// linear.rst (path form).
	{"0 2097152 linear /dev/sdb1 0", "linear"},
	// striped.rst: 128 KiB chunks over two devices.
	{"0 8388608 striped 2 256 /dev/sda 0 /dev/sdb 0", "striped"},
	// dm-crypt.rst examples.
	{"0 2097152 crypt aes-cbc-essiv:sha256 babebabebabebabebabebabebabebabe 0 /dev/sdb 0", "crypt"},
	{"0 2097152 crypt aes-cbc-essiv:sha256 :32:logon:my_prefix:my_key 0 /dev/sdb 0", "crypt"},
	// REPORT.md: cryptsetup's mapping after reencrypt (keyring key).
	{"0 458752 crypt aes-xts-plain64 :64:logon:cryptsetup:3e8c1a36-30ad-4d02-8f5e-9e1a7a8e8e4d-d0 0 254:16 32768", "crypt"},
	// REPORT.md anchor B: a chunk routed through the mirror.
	{"458752 32768 mirror core 1 1024 2 254:0 458752 253:3 458752", "mirror"},
	// Kernel 6.1 in the test VM, `dmsetup table` of tables the guest
	// differential tests load (TestGuestDifferentialTables logs them;
	// crypt keys as dmsetup masks them).
	{"0 131072 linear 254:0 0", "linear"},
	{"8192 8192 linear 254:16 8192", "linear"},
	{"0 16384 striped 2 128 254:0 0 254:16 0", "striped"},
	{"0 16384 crypt aes-xts-plain64 Z64 0 254:0 0", "crypt"},
	{"0 16384 crypt aes-cbc-plain64 Z32 0 254:0 0", "crypt"},
	{"0 16384 crypt aes-xts-plain64 Z64 0 254:0 0 5 allow_discards same_cpu_crypt submit_from_crypt_cpus no_read_workqueue no_write_workqueue", "crypt"},
	{"0 16384 crypt aes-xts-plain64 Z64 0 254:0 0 2 sector_size:4096 iv_large_sectors", "crypt"},
	{"0 16384 crypt capi:xts(aes)-plain64 Z64 16 254:0 32 1 allow_discards", "crypt"},
	{"0 16384 crypt aes-xts-plain64 :64:logon:dmtable:guest-test 0 254:0 0", "crypt"},
	{"0 32768 mirror core 1 1024 2 254:0 0 254:16 0", "mirror"},
	{"0 32768 mirror core 2 1024 nosync 2 254:0 0 254:16 32768", "mirror"},
	{"0 32768 mirror core 2 1024 sync 2 254:0 0 254:16 0 1 handle_errors", "mirror"},
	{"0 32768 mirror disk 2 253:0 1024 2 254:0 0 254:16 0 2 handle_errors keep_log", "mirror"},
	{"0 2048 error", "error"},
	{"0 2048 zero", "zero"},
	{"1024 1024 zero", "zero"},
	{"2048 1024 error", "error"},
	// The same crypt line with real key material (--showkeys form).
	{"0 16384 crypt aes-xts-plain64 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f 0 254:0 0 5 allow_discards same_cpu_crypt submit_from_crypt_cpus no_read_workqueue no_write_workqueue", "crypt"},
	// No key ("-"), as the kernel prints a zero-size key.
	{"0 8 crypt cipher_null-ecb - 0 254:0 0", "crypt"},
	// Unknown targets kept verbatim: thin-provisioning.rst, snapshot.rst.
	{"0 20971520 thin-pool /dev/sdc1 /dev/sdc2 128 32768 1 skip_block_zeroing", "thin-pool"},
	{"0 2097152 snapshot 253:1 253:2 P 8", "snapshot"},
}

func init() {
	// Z64/Z32: masked 64- and 32-byte keys (one '0' per hex digit).
	for i := range kernelLines {
		kernelLines[i].line = strings.NewReplacer("Z64", strings.Repeat("0", 128), "Z32", strings.Repeat("0", 64)).Replace(kernelLines[i].line)
	}
}

func TestParseKernelLinesRoundTrip(t *testing.T) {
	for _, c := range kernelLines {
		tg, err := Parse(c.line)
		if err != nil {
			t.Errorf("Parse(%q): %v", c.line, err)
			continue
		}
		if tg.Type() != c.typ {
			t.Errorf("Parse(%q).Type() = %q, want %q", c.line, tg.Type(), c.typ)
		}
		if got := tg.Payload(); got != c.line {
			t.Errorf("round trip:\n got %q\nwant %q", got, c.line)
		}
		// String masks hex keys only; other lines print identically.
		if c.typ != "crypt" || tg.Params.(*Crypt).Key.IsKeyring() || tg.Params.(*Crypt).Key.IsEmpty() {
			if got := tg.String(); got != c.line {
				t.Errorf("String():\n got %q\nwant %q", got, c.line)
			}
		}
		again, err := Parse(tg.Payload())
		if err != nil || !again.Equal(tg) {
			t.Errorf("Parse(Payload()) of %q: %v, equal=%v", c.line, err, err == nil && again.Equal(tg))
		}
	}
}

func TestParseTypedFields(t *testing.T) {
	tg, err := Parse("458752 32768 mirror core 1 1024 2 254:0 458752 253:3 458752")
	if err != nil {
		t.Fatal(err)
	}
	m := tg.Params.(*Mirror)
	want := &Mirror{
		Log:  MirrorLog{Type: "core", RegionSize: 1024},
		Legs: []MirrorLeg{{Dev: Dev{254, 0}.Ref(), Offset: 458752}, {Dev: Dev{253, 3}.Ref(), Offset: 458752}},
	}
	if m.String() != want.String() || tg.Start != 458752 || tg.Length != 32768 {
		t.Fatalf("mirror parsed as %+v", m)
	}
	if err := (Table{{Start: 0, Length: 32768, Params: want}}).Validate(); err != nil {
		t.Fatalf("built mirror does not validate: %v", err)
	}

	tg, err = Parse("0 16384 crypt capi:xts(aes)-plain64 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f 16 254:0 32 1 allow_discards")
	if err != nil {
		t.Fatal(err)
	}
	c := tg.Params.(*Crypt)
	if c.IVOffset != 16 || c.Offset != 32 || c.Dev.Num != (Dev{254, 0}) || !c.AllowDiscards || c.Key.Size() != 32 {
		t.Fatalf("crypt parsed as %s", c)
	}
	sp, err := c.Cipher.Spec()
	if err != nil || !sp.Capi || sp.API != "xts(aes)" || sp.IVMode != "plain64" {
		t.Fatalf("cipher spec %+v, %v", sp, err)
	}

	tg, err = Parse("0 2097152 crypt aes-cbc-essiv:sha256 :32:logon:my_prefix:my_key 0 /dev/sdb 0")
	if err != nil {
		t.Fatal(err)
	}
	c = tg.Params.(*Crypt)
	typ, desc, ok := c.Key.Keyring()
	if !ok || typ != "logon" || desc != "my_prefix:my_key" || c.Key.Size() != 32 || c.Dev.Path != "/dev/sdb" {
		t.Fatalf("keyring crypt parsed as %s", c)
	}
}

func TestCipherSpecForms(t *testing.T) {
	cases := []struct {
		in   string
		want CipherSpec
	}{
		{"aes-xts-plain64", CipherSpec{Cipher: "aes", ChainMode: "xts", IVMode: "plain64"}},
		{"aes-cbc-essiv:sha256", CipherSpec{Cipher: "aes", ChainMode: "cbc", IVMode: "essiv", IVOpts: "sha256"}},
		{"serpent-xts-plain64", CipherSpec{Cipher: "serpent", ChainMode: "xts", IVMode: "plain64"}},
		{"aes:64-cbc-lmk", CipherSpec{Cipher: "aes", KeyCount: 64, ChainMode: "cbc", IVMode: "lmk"}},
		{"aes", CipherSpec{Cipher: "aes"}},
		{"cipher_null-ecb", CipherSpec{Cipher: "cipher_null", ChainMode: "ecb"}},
		{"capi:cbc(aes)-essiv:sha256", CipherSpec{Capi: true, API: "cbc(aes)", IVMode: "essiv", IVOpts: "sha256"}},
		{"capi:xts(aes)-plain64", CipherSpec{Capi: true, API: "xts(aes)", IVMode: "plain64"}},
		{"capi:gcm(aes)-random", CipherSpec{Capi: true, API: "gcm(aes)", IVMode: "random"}},
		{"capi:authenc(hmac(sha256),xts(aes))-random", CipherSpec{Capi: true, API: "authenc(hmac(sha256),xts(aes))", IVMode: "random"}},
		{"capi:rfc7539(chacha20,poly1305)-random", CipherSpec{Capi: true, API: "rfc7539(chacha20,poly1305)", IVMode: "random"}},
		{"capi:cbc(aes)-essiv:sha3-256", CipherSpec{Capi: true, API: "cbc(aes)", IVMode: "essiv", IVOpts: "sha3-256"}},
	}
	for _, c := range cases {
		got, err := Cipher(c.in).Spec()
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if got != c.want {
			t.Errorf("%q: got %+v, want %+v", c.in, got, c.want)
		}
		if got.String() != c.in {
			t.Errorf("%q: String() = %q", c.in, got.String())
		}
	}
	for _, bad := range []string{"", "capi:", "capi:-plain64", "-xts-plain64", "aes--plain64", "aes:0-cbc-plain", "aes-cbc-essiv:", "a b"} {
		if _, err := Cipher(bad).Spec(); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestCryptKeyNeverPrinted(t *testing.T) {
	key := []byte("\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\x20")
	hexKey := "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20"
	c := &Crypt{Cipher: "aes-xts-plain64", Key: HexKey(key), Dev: Dev{254, 0}.Ref(), Offset: 4096}
	tg := Target{Start: 0, Length: 8192, Params: c}
	tbl := Table{tg}
	prints := []string{
		tg.String(), tbl.String(), c.String(), c.Key.String(),
		fmt.Sprintf("%v", tg), fmt.Sprintf("%+v", tg), fmt.Sprintf("%#v", tg), fmt.Sprintf("%s", c),
		fmt.Sprintf("%v", c.Key), fmt.Sprintf("%#v", c.Key), fmt.Sprintf("%x", c.Key), fmt.Sprintf("%q", c.Key),
		fmt.Sprintf("%v", tbl), fmt.Sprintf("%#v", tbl), fmt.Sprintf("%+v", *c), fmt.Sprintf("%#v", *c),
	}
	for _, p := range prints {
		if strings.Contains(p, hexKey) || strings.Contains(p, "0102030405") || strings.Contains(p, "\x01\x02\x03") {
			t.Errorf("key material printed: %q", p)
		}
		if strings.Contains(p, "[1 2 3 4") {
			t.Errorf("key bytes printed: %q", p)
		}
	}
	if want := "0 8192 crypt aes-xts-plain64 " + strings.Repeat("0", 64) + " 0 254:0 4096"; tg.String() != want {
		t.Errorf("masked line %q, want %q", tg.String(), want)
	}
	if want := "0 8192 crypt aes-xts-plain64 " + hexKey + " 0 254:0 4096"; tg.Payload() != want {
		t.Errorf("payload %q, want %q", tg.Payload(), want)
	}
	// An error about a crypt line must not quote the key either.
	_, err := Parse("0 8 crypt aes-xts-plain64 " + hexKey + " 0 254:0 x")
	if err == nil || strings.Contains(err.Error(), hexKey) {
		t.Errorf("parse error %v", err)
	}
	_, err = Parse("0 8 crypt aes-xts-plain64 " + hexKey)
	if err == nil || strings.Contains(err.Error(), hexKey) {
		t.Errorf("parse error %v", err)
	}
}

func TestKeyWipeAndEqual(t *testing.T) {
	src := []byte{1, 2, 3, 4}
	k := HexKey(src)
	src[0] = 9 // HexKey copied
	if k.Payload() != "01020304" {
		t.Fatalf("payload %q", k.Payload())
	}
	copyOfK := k
	if !k.Equal(copyOfK) || k.Equal(HexKey([]byte{1, 2, 3, 5})) || k.Equal(HexKey([]byte{1, 2, 3})) {
		t.Fatal("Equal wrong")
	}
	k.Wipe()
	if copyOfK.Payload() != "00000000" {
		t.Fatalf("wipe did not reach the copy: %q", copyOfK.Payload())
	}
	if !KeyringKey(64, "logon", "a:b").Equal(KeyringKey(64, "logon", "a:b")) || KeyringKey(64, "logon", "a").Equal(HexKey(make([]byte, 64))) {
		t.Fatal("keyring Equal wrong")
	}
	for _, bad := range []string{"0", "0g", "ABCD", ":64:logon", "::logon:x", ":0:logon:x", ":64::x", ":64:logon:"} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) accepted", bad)
		}
	}
}

func TestBuildByValue(t *testing.T) {
	d := Dev{Major: 254, Minor: 0}
	c := Dev{Major: 253, Minor: 3}
	tbl := Table{
		{Start: 0, Length: 1024, Params: &Linear{Dev: d.Ref(), Offset: 0}},
		{Start: 1024, Length: 32768, Params: &Mirror{
			Log:  MirrorLog{Type: "core", RegionSize: 1024},
			Legs: []MirrorLeg{{Dev: d.Ref(), Offset: 1024}, {Dev: c.Ref(), Offset: 1024}},
		}},
		{Start: 33792, Length: 4096, Params: &Crypt{Cipher: "aes-xts-plain64", Key: HexKey(make([]byte, 64)), IVOffset: 33792, Dev: d.Ref(), Offset: 65536}},
	}
	if err := tbl.Validate(); err != nil {
		t.Fatal(err)
	}
	if tbl.Size() != 37888 {
		t.Fatalf("size %d", tbl.Size())
	}
	want := "0 1024 linear 254:0 0\n" +
		"1024 32768 mirror core 1 1024 2 254:0 1024 253:3 1024\n" +
		"33792 4096 crypt aes-xts-plain64 " + strings.Repeat("0", 128) + " 33792 254:0 65536"
	if tbl.String() != want {
		t.Fatalf("table:\n%s\nwant:\n%s", tbl, want)
	}
	back, err := ParseTable(tbl.Payload())
	if err != nil || !back.Equal(tbl) {
		t.Fatalf("ParseTable(Payload()): %v", err)
	}
}

func TestValidate(t *testing.T) {
	d := Dev{254, 0}.Ref()
	lin := func(start, n Sectors) Target {
		return Target{Start: start, Length: n, Params: &Linear{Dev: d}}
	}
	mir := func(n, region Sectors) Table {
		return Table{{Start: 0, Length: n, Params: &Mirror{Log: MirrorLog{Type: "core", RegionSize: region},
			Legs: []MirrorLeg{{Dev: d}, {Dev: d, Offset: n}}}}}
	}
	bad := map[string]Table{
		"empty":                   {},
		"not at 0":                {lin(8, 8)},
		"gap":                     {lin(0, 8), lin(16, 8)},
		"overlap":                 {lin(0, 8), lin(4, 8)},
		"zero length":             {lin(0, 0)},
		"nil params":              {{Start: 0, Length: 8}},
		"no device":               {{Start: 0, Length: 8, Params: &Linear{}}},
		"region not power of two": mir(32768, 3000),
		"region 1":                mir(32768, 1),
		"region above length":     mir(32768, 65536),
		"one leg": {{Start: 0, Length: 8, Params: &Mirror{Log: MirrorLog{Type: "core", RegionSize: 2},
			Legs: []MirrorLeg{{Dev: d}}}}},
		"block_on_error": {{Start: 0, Length: 8, Params: &Mirror{Log: MirrorLog{Type: "core", RegionSize: 2, BlockOnError: true},
			Legs: []MirrorLeg{{Dev: d}, {Dev: d}}}}},
		"keep_log alone": {{Start: 0, Length: 8, Params: &Mirror{Log: MirrorLog{Type: "core", RegionSize: 2},
			Legs: []MirrorLeg{{Dev: d}, {Dev: d}}, KeepLog: true}}},
		"crypt sector size": {{Start: 0, Length: 12, Params: &Crypt{Cipher: "aes-xts-plain64", Key: HexKey(make([]byte, 64)), Dev: d, SectorSize: 4096}}},
		"crypt bad cipher":  {{Start: 0, Length: 8, Params: &Crypt{Cipher: "", Dev: d}}},
		"striped width":     {{Start: 0, Length: 100, Params: &Striped{ChunkSize: 8, Stripes: []Stripe{{Dev: d}, {Dev: d}}}}},
	}
	for name, tbl := range bad {
		if err := tbl.Validate(); err == nil {
			t.Errorf("%s: validated", name)
		}
	}
	good := map[string]Table{
		"contiguous":           {lin(0, 8), lin(8, 8)},
		"region = length":      mir(32768, 32768),
		"region 2":             mir(32768, 2),
		"length not multiple":  mir(30000, 1024), // FACTS.md: 30000/1024 -> 30 regions, accepted
		"crypt 4k":             {{Start: 0, Length: 16, Params: &Crypt{Cipher: "aes-xts-plain64", Key: HexKey(make([]byte, 64)), Dev: d, SectorSize: 4096, Offset: 8}}},
		"striped":              {{Start: 0, Length: 512, Params: &Striped{ChunkSize: 128, Stripes: []Stripe{{Dev: d}, {Dev: d, Offset: 256}}}}},
		"error and zero":       {{Start: 0, Length: 8, Params: &Error{}}, {Start: 8, Length: 8, Params: &Zero{}}},
		"handle_errors+keep":   {{Start: 0, Length: 8, Params: &Mirror{Log: MirrorLog{Type: "core", RegionSize: 8}, Legs: []MirrorLeg{{Dev: d}, {Dev: d}}, HandleErrors: true, KeepLog: true}}},
		"other kept verbatim":  {{Start: 0, Length: 8, Params: &Other{TargetType: "delay", Args: []string{"254:0", "0", "100"}}}},
		"keyring crypt target": {{Start: 0, Length: 8, Params: &Crypt{Cipher: "aes-xts-plain64", Key: KeyringKey(64, "logon", "cryptsetup:x"), Dev: d}}},
	}
	for name, tbl := range good {
		if err := tbl.Validate(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestEqualIsCanonical(t *testing.T) {
	a, err := ParseTable("0 8 crypt aes-xts-plain64 " + strings.Repeat("ab", 64) + " 0 254:0 0 3 sector_size:512 same_cpu_crypt allow_discards")
	if err != nil {
		t.Fatal(err)
	}
	b, err := ParseTable("0 8 crypt aes-xts-plain64 " + strings.Repeat("ab", 64) + " 0 254:0 0 2 allow_discards same_cpu_crypt")
	if err != nil {
		t.Fatal(err)
	}
	if !a.Equal(b) {
		t.Fatalf("option order and default sector size should not matter:\n%s\n%s", a.Payload(), b.Payload())
	}
	c, _ := ParseTable("0 8 crypt aes-xts-plain64 " + strings.Repeat("ac", 64) + " 0 254:0 0 2 allow_discards same_cpu_crypt")
	if a.Equal(c) {
		t.Fatal("different keys compare equal")
	}
	// Masked String()s are the same, yet the tables differ: Equal must
	// look at the key.
	if a.String() != c.String() {
		t.Fatal("masked forms differ")
	}
	l1, _ := ParseTable("0 8 linear 254:0 0\n8 8 linear 254:0 8")
	l2, _ := ParseTable("0 8 linear 254:0 0\n8 8 linear 254:0 16")
	if l1.Equal(l2) || !l1.Equal(l1.Clone()) {
		t.Fatal("linear Equal wrong")
	}
}

func TestReplaceDevice(t *testing.T) {
	tbl, err := ParseTable(strings.Join([]string{
		"0 1024 linear 254:0 0",
		"1024 2048 striped 2 128 254:0 0 254:16 0",
		"3072 32768 mirror disk 2 254:0 1024 2 254:0 1024 253:3 1024",
		"35840 4096 crypt aes-xts-plain64 " + strings.Repeat("11", 64) + " 0 254:0 4096",
		"39936 8 snapshot 254:0 253:2 P 8",
		"39944 8 zero",
	}, "\n"))
	if err != nil {
		t.Fatal(err)
	}
	from, to := Dev{254, 0}.Ref(), Dev{253, 7}.Ref()
	out, n := tbl.ReplaceDevice(from, to)
	if n != 6 {
		t.Fatalf("replaced %d references, want 6", n)
	}
	if out.References(from) || !out.References(to) {
		t.Fatal("references not replaced")
	}
	if !tbl.References(from) {
		t.Fatal("ReplaceDevice modified its receiver")
	}
	want := strings.Join([]string{
		"0 1024 linear 253:7 0",
		"1024 2048 striped 2 128 253:7 0 254:16 0",
		"3072 32768 mirror disk 2 253:7 1024 2 253:7 1024 253:3 1024",
		"35840 4096 crypt aes-xts-plain64 " + strings.Repeat("11", 64) + " 0 253:7 4096",
		"39936 8 snapshot 253:7 253:2 P 8",
		"39944 8 zero",
	}, "\n")
	if out.Payload() != want {
		t.Fatalf("got\n%s\nwant\n%s", out.Payload(), want)
	}
	back, n := out.ReplaceDevice(to, from)
	if n != 6 || !back.Equal(tbl) {
		t.Fatal("replacing back does not restore the table")
	}
	devs := tbl.Devices()
	if len(devs) != 4 {
		t.Fatalf("Devices() = %v", devs)
	}
	// Paths and numbers are different references.
	if _, n := tbl.ReplaceDevice(PathRef("/dev/vda"), to); n != 0 {
		t.Fatal("path matched a number")
	}
}

func TestSectorsAndDev(t *testing.T) {
	if s, err := SectorsFromBytes(1 << 20); err != nil || s != 2048 {
		t.Fatalf("1 MiB = %d sectors, %v", s, err)
	}
	if _, err := SectorsFromBytes(1000); err == nil {
		t.Fatal("1000 bytes accepted")
	}
	if Sectors(2048).Bytes() != 1<<20 {
		t.Fatal("Bytes wrong")
	}
	d, err := ParseDev("254:16")
	if err != nil || d != (Dev{254, 16}) || d.String() != "254:16" {
		t.Fatalf("ParseDev: %v %v", d, err)
	}
	for _, bad := range []string{"254", ":1", "1:", "a:b", "01:2", "-1:2", "4294967296:0"} {
		if _, err := ParseDev(bad); err == nil {
			t.Errorf("ParseDev(%q) accepted", bad)
		}
	}
	for _, s := range []string{"254:0", "/dev/vda", "/dev/mapper/vg-lv", "vda"} {
		r, err := ParseDevRef(s)
		if err != nil || r.String() != s {
			t.Errorf("ParseDevRef(%q) = %v, %v", s, r, err)
		}
	}
	// The kernel's new_encode_dev: 254:0 is 0xfe00; minor 256 goes to bit 20.
	cases := map[Dev]uint64{{254, 0}: 0xfe00, {8, 1}: 0x801, {253, 256}: 0x10fd00, {259, 0x12345}: 0x12310345}
	for d, v := range cases {
		if got := d.encode(); got != v {
			t.Errorf("%v.encode() = %#x, want %#x", d, got, v)
		}
		if got := decodeDev(v); got != d {
			t.Errorf("decodeDev(%#x) = %v, want %v", v, got, d)
		}
	}
}

func TestParseErrors(t *testing.T) {
	bad := []string{
		"",
		"0 8",
		"x 8 linear 254:0 0",
		"0 -8 linear 254:0 0",
		"0 8 linear 254:0",
		"0 8 linear 254:0 0 extra",
		"0 8 linear 254:0 x",
		"0 8 striped 2 128 254:0 0",
		"0 8 crypt aes-xts-plain64 00 0 254:0 0 2 allow_discards",
		"0 8 crypt aes-xts-plain64 0 0 254:0 0",
		"0 8 mirror core 1 1024 2 254:0 0",
		"0 8 mirror core 3 1024 2 254:0 0 254:1 0",
		"0 8 mirror core 2 1024 bogus 2 254:0 0 254:1 0",
		"0 8 mirror core 1 1024 2 254:0 0 254:1 0 2 handle_errors",
		"0 8 error x",
		"0 8 zero x",
		"0 8 averyveryverylongtypename 1",
	}
	for _, l := range bad {
		if _, err := Parse(l); err == nil {
			t.Errorf("Parse(%q) accepted", l)
		}
	}
}

func TestErrorsIs(t *testing.T) {
	// errors.Is on both the sentinel and the errno, through wrapping.
	err := fmt.Errorf("restacking: %w", &OpError{Op: "remove", Device: "vg-lv", Err: unix.EBUSY})
	if !errors.Is(err, ErrBusy) || !errors.Is(err, unix.EBUSY) || errors.Is(err, ErrExists) {
		t.Fatalf("remove EBUSY: %v", err)
	}
	err = &OpError{Op: "create", Device: "x", Err: unix.EBUSY}
	if !errors.Is(err, ErrExists) || errors.Is(err, ErrBusy) || !errors.Is(err, unix.EBUSY) {
		t.Fatalf("create EBUSY: %v", err)
	}
	err = &OpError{Op: "info", Device: "x", Err: unix.ENXIO}
	if !errors.Is(err, ErrNotFound) || !errors.Is(err, unix.ENXIO) {
		t.Fatalf("info ENXIO: %v", err)
	}
	err = &OpError{Op: "load", Device: "x", Err: fmt.Errorf("bad: %w", unix.EINVAL)}
	if !errors.Is(err, ErrInvalid) || !errors.Is(err, unix.EINVAL) {
		t.Fatalf("load EINVAL: %v", err)
	}
	if got := err.Error(); got != "dm load x: bad: invalid argument" {
		t.Fatalf("message %q", got)
	}
	var op *OpError
	if !errors.As(fmt.Errorf("x: %w", err), &op) || op.Op != "load" || op.Device != "x" {
		t.Fatal("errors.As")
	}
}

// TestOtherMasksIntegrityKeys: dm-integrity's table shows its keys
// (name:algorithm:hexkey); String, and so every message and plan that
// prints a table, masks them; Payload keeps them for the kernel.
func TestOtherMasksIntegrityKeys(t *testing.T) {
	const key = "00112233445566778899aabbccddeeff"
	line := "0 2048 integrity 8:16 0 32 J 4 journal_sectors:128 internal_hash:hmac(sha256):" + key + " journal_mac:hmac(sha256):" + key + " journal_crypt:ctr(aes):" + key
	tg, err := Parse(line)
	if err != nil {
		t.Fatal(err)
	}
	tbl := Table{tg}
	for _, s := range []string{tg.String(), tbl.String(), fmt.Sprint(tbl), fmt.Sprintf("%v", tg)} {
		if strings.Contains(s, key) {
			t.Fatalf("a key in the printed table: %s", s)
		}
		for _, want := range []string{"internal_hash:hmac(sha256):000", "journal_mac:hmac(sha256):000", "journal_crypt:ctr(aes):000", "journal_sectors:128"} {
			if !strings.Contains(s, want) {
				t.Fatalf("%q missing from the printed table %s", want, s)
			}
		}
	}
	if p := tbl.Payload(); strings.Count(p, key) != 3 {
		t.Fatalf("the payload lost a key: %s", p)
	}
}
