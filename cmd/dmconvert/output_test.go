package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/convert"
)

func TestJSONEventLines(t *testing.T) {
	var b bytes.Buffer
	p := &jsonProgress{w: &b}
	at := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	p.Event(convert.Event{Kind: convert.EventPhase, Phase: "move [128,3800) disk+0 -> new+0 backward by 128", Done: 65536, Total: 1945600, Time: at})
	p.Event(convert.Event{Kind: convert.EventChunk, Done: 131072, Total: 1945600, Stall: 3 * time.Millisecond, Time: at})
	p.note("interrupt: stopping at the next safe point")
	p.Event(convert.Event{Kind: convert.EventDone, Done: 1945600, Total: 1945600, Time: at})
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	if len(lines) != 4 {
		t.Fatalf("%d lines, want 4:\n%s", len(lines), b.String())
	}
	want := []string{
		`{"event":"phase","phase":"move [128,3800) disk+0 -\u003e new+0 backward by 128","done_bytes":65536,"total_bytes":1945600,"time":"2024-05-01T12:00:00Z"}`,
		`{"event":"chunk","done_bytes":131072,"total_bytes":1945600,"stall_ns":3000000,"time":"2024-05-01T12:00:00Z"}`,
		"",
		`{"event":"done","done_bytes":1945600,"total_bytes":1945600,"time":"2024-05-01T12:00:00Z"}`,
	}
	for i, l := range lines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("line %d %q: %v", i, l, err)
		}
		if want[i] != "" && l != want[i] {
			t.Errorf("line %d:\n got %s\nwant %s", i, l, want[i])
		}
	}
	var m map[string]any
	json.Unmarshal([]byte(lines[2]), &m)
	if m["event"] != "message" || m["message"] != "interrupt: stopping at the next safe point" {
		t.Fatalf("note line: %s", lines[2])
	}
}

func TestJSONResultLine(t *testing.T) {
	ta := newTestApp(t)
	ta.a.json = true
	ta.a.emitResult(&result{Command: "resume", Device: "/dev/vda", Journal: "/j"}, errors.Join(errors.New("unlocking the header of /dev/vda"), convert.ErrWrongPassphrase))
	r := ta.jsonResult()
	if r["command"] != "resume" || r["outcome"] != "wrong-passphrase" || r["exit_code"] != 3.0 || r["device"] != "/dev/vda" || r["journal"] != "/j" ||
		!strings.Contains(r["error"].(string), "unlocking the header") {
		t.Fatalf("result: %v", r)
	}
	ta.out.Reset()
	ta.a.emitResult(&result{Command: "encrypt", Outcome: "done", Crypttab: crypttabLine("vda_crypt", "u")}, nil)
	r = ta.jsonResult()
	if r["outcome"] != "done" || r["exit_code"] != 0.0 || r["crypttab"] != "vda_crypt UUID=u none luks" {
		t.Fatalf("result: %v", r)
	}
	if _, ok := r["error"]; ok {
		t.Fatalf("a success carries an error: %v", r)
	}
}

func TestPlainProgressIsOccasional(t *testing.T) {
	var b bytes.Buffer
	p := &plainProgress{w: &b, every: 10 * time.Second}
	t0 := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	total := uint64(100 << 20)
	p.Event(convert.Event{Kind: convert.EventPhase, Phase: "setup", Total: total, Time: t0})
	for i := 1; i <= 100; i++ {
		// One chunk a second for 100 seconds.
		p.Event(convert.Event{Kind: convert.EventChunk, Done: uint64(i) << 20, Total: total, Time: t0.Add(time.Duration(i) * time.Second)})
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if lines[0] != "setting up the mappings (0.0% of 100.0 MiB copied)" {
		t.Fatalf("phase line %q", lines[0])
	}
	// A line every 10 s, and the last chunk.
	if len(lines) != 11 {
		t.Fatalf("%d lines for 100 s of chunks, want 11:\n%s", len(lines), b.String())
	}
	if !strings.Contains(lines[1], "10.0%") || !strings.Contains(lines[1], "1.0 MiB/s") || !strings.Contains(lines[1], "about 1m30s left") {
		t.Fatalf("progress line %q", lines[1])
	}
	if !strings.Contains(lines[10], "100.0%") {
		t.Fatalf("last line %q", lines[10])
	}
}

func TestBarProgressDoesNotPrintKeyOrPanic(t *testing.T) {
	var b bytes.Buffer
	p := &barProgress{w: &b}
	t0 := time.Now()
	p.Event(convert.Event{Kind: convert.EventPhase, Phase: "setup", Done: 0, Total: 1 << 20, Time: t0})
	p.Event(convert.Event{Kind: convert.EventPhase, Phase: "move [0,128) disk+0 -> disk+3968 backward by 128", Total: 1 << 20, Time: t0})
	p.Event(convert.Event{Kind: convert.EventChunk, Done: 1 << 19, Total: 1 << 20, Time: t0})
	p.note("interrupt: stopping at the next safe point")
	p.Event(convert.Event{Kind: convert.EventChunk, Done: 1 << 20, Total: 1 << 20, Time: t0})
	p.finish(true)
	out := b.String()
	if !strings.Contains(out, "copying the start of the disk to its end") || !strings.Contains(out, "interrupt: stopping") || !strings.Contains(out, "100%") {
		t.Fatalf("bar output:\n%q", out)
	}
	// A resumed run: the bar covers what remains.
	b.Reset()
	p = &barProgress{w: &b}
	p.Event(convert.Event{Kind: convert.EventPhase, Phase: "move [128,3800) disk+0 -> new+0 backward by 128", Done: 1 << 19, Total: 1 << 20, Time: t0})
	if !strings.Contains(b.String(), "encrypting (resumed at 50%)") {
		t.Fatalf("resumed bar:\n%q", b.String())
	}
	// Nothing left to copy (finalize after a crash): no bar, no panic.
	b.Reset()
	p = &barProgress{w: &b}
	p.Event(convert.Event{Kind: convert.EventPhase, Phase: "finalize", Done: 1 << 20, Total: 1 << 20, Time: t0})
	p.finish(true)
	if !strings.Contains(b.String(), "finalizing") {
		t.Fatalf("finalize without a bar:\n%q", b.String())
	}
}

func TestCrypttab(t *testing.T) {
	line := crypttabLine("vda_crypt", "0b8e2c3e-9c7e-4a51-8d35-8e2b9d1c7f00")
	if line != "vda_crypt UUID=0b8e2c3e-9c7e-4a51-8d35-8e2b9d1c7f00 none luks" {
		t.Fatalf("crypttab line %q", line)
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "crypttab")
	// A new file.
	if added, err := appendCrypttab(p, "vda_crypt", line); err != nil || !added {
		t.Fatalf("new file: %v %v", added, err)
	}
	// The same line again: nothing added.
	if added, err := appendCrypttab(p, "vda_crypt", line); err != nil || added {
		t.Fatalf("same line: %v %v", added, err)
	}
	b, _ := os.ReadFile(p)
	if string(b) != line+"\n" {
		t.Fatalf("file %q", b)
	}
	// An existing file without a final newline, with a comment naming
	// the mapping and another entry.
	q := filepath.Join(dir, "crypttab2")
	old := "# vda_crypt was here\nswap /dev/vdb /dev/urandom swap"
	os.WriteFile(q, []byte(old), 0o644)
	if added, err := appendCrypttab(q, "vda_crypt", line); err != nil || !added {
		t.Fatalf("existing file: %v %v", added, err)
	}
	b, _ = os.ReadFile(q)
	if string(b) != old+"\n"+line+"\n" {
		t.Fatalf("file %q", b)
	}
	// Another entry with the name: refused, file unchanged.
	r := filepath.Join(dir, "crypttab3")
	other := "vda_crypt UUID=1111 none luks,discard\n"
	os.WriteFile(r, []byte(other), 0o644)
	if _, err := appendCrypttab(r, "vda_crypt", line); err == nil || !strings.Contains(err.Error(), "already has an entry for vda_crypt") {
		t.Fatalf("conflicting entry: %v", err)
	}
	b, _ = os.ReadFile(r)
	if string(b) != other {
		t.Fatalf("file changed: %q", b)
	}
}

func TestFinishEncryptText(t *testing.T) {
	ta := newTestApp(t)
	p, err := convert.BuildEncrypt(convert.EncryptGeometry{DiskSize: 65536, Payload: 40960, Header: 2048, Align: 8})
	if err != nil {
		t.Fatal(err)
	}
	spec := &convert.Spec{Op: "encrypt", Disk: convert.DiskInfo{Path: "/dev/vda"}, Name: "vda_crypt", VG: "vg0",
		Crypt: convert.CryptSpec{Cipher: "aes-xts-plain64", KeyBytes: 64, SectorSize: 512}, LUKSVersion: 2, LUKSUUID: "0b8e2c3e-9c7e-4a51-8d35-8e2b9d1c7f00", Forward: p}
	r := &result{}
	ta.a.finishEncrypt(r, spec, ta.a.crypttab)
	out := ta.out.String()
	for _, want := range []string{
		"Done: /dev/vda is encrypted (LUKS2, aes-xts-plain64, 512-bit key); volume group vg0 now lives on /dev/mapper/vda_crypt.",
		"crypttab line (in " + ta.a.crypttab + "):\n  vda_crypt UUID=0b8e2c3e-9c7e-4a51-8d35-8e2b9d1c7f00 none luks",
		"update-initramfs -u", "dracut -f",
		// 65536 - 2048 - 40960 sectors = 11.0 MiB
		"left 11.0 MiB free", "pvresize /dev/mapper/vda_crypt",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if r.FreeBytes != (65536-2048-40960)*512 || r.CrypttabFile != ta.a.crypttab {
		t.Fatalf("result %+v", r)
	}
	b, _ := os.ReadFile(ta.a.crypttab)
	if string(b) != r.Crypttab+"\n" {
		t.Fatalf("crypttab %q", b)
	}
}

// A decrypt's result says how much the header's space leaves after the
// PV on the disk and how to grow the PV into it; a file system on the
// mapping gets no such line.
func TestFinishDecryptText(t *testing.T) {
	for _, hg := range []bool{false, true} {
		p, err := convert.BuildDecrypt(convert.DecryptGeometry{DiskSize: 65536, Payload: 40960, Header: 4096, Align: 8, HeaderGap: hg})
		if err != nil {
			t.Fatal(err)
		}
		for _, vg := range []string{"vg0", ""} {
			ta := newTestApp(t)
			spec := &convert.Spec{Op: "decrypt", Disk: convert.DiskInfo{Path: "/dev/vda"}, Name: "vda_crypt", VG: vg, LUKSVersion: 2, Forward: p}
			r := &result{}
			ta.a.finishDecrypt(r, spec)
			out := ta.out.String()
			if vg == "" {
				if r.FreeBytes != 0 || strings.Contains(out, "pvresize") {
					t.Fatalf("header gap %v, no VG: free %d\n%s", hg, r.FreeBytes, out)
				}
				continue
			}
			// 65536 - 40960 sectors = 12.0 MiB
			for _, want := range []string{"volume group vg0 is on it", "ends 12.0 MiB before the end of /dev/vda", "  pvresize /dev/vda\n"} {
				if !strings.Contains(out, want) {
					t.Errorf("header gap %v: output lacks %q:\n%s", hg, want, out)
				}
			}
			if r.FreeBytes != (65536-40960)*512 {
				t.Fatalf("header gap %v: free %d", hg, r.FreeBytes)
			}
		}
	}
}

// The rekey plan says the cipher and key size before and after, and the
// --json plan carries both.
func TestRekeyPlanShowsCipher(t *testing.T) {
	p, err := convert.BuildRekey(convert.RekeyGeometry{DiskSize: 65536, Header: 32768, Gap: 8192, Align: 8})
	if err != nil {
		t.Fatal(err)
	}
	old := convert.CryptSpec{Cipher: "aes-xts-plain64", KeyBytes: 64, SectorSize: 512}
	for _, c := range []struct {
		crypt convert.CryptSpec
		want  string
	}{
		{old, "cipher:        aes-xts-plain64 with a 512-bit key, 512-byte sectors; unchanged"},
		{convert.CryptSpec{Cipher: "serpent-xts-plain64", KeyBytes: 32, SectorSize: 512},
			"cipher:        aes-xts-plain64 with a 512-bit key, 512-byte sectors; changes to serpent-xts-plain64 with a 256-bit key"},
	} {
		ta := newTestApp(t)
		spec := &convert.Spec{Op: "rekey", Disk: convert.DiskInfo{Path: "/dev/vda"}, Name: "vda_crypt",
			Crypt: c.crypt, OldCrypt: old, LUKSVersion: 2, LUKSUUID: "0b8e2c3e-9c7e-4a51-8d35-8e2b9d1c7f00", Forward: p}
		ta.a.printRekeyPlan(&convert.EncryptPlan{Spec: spec, Journal: "/j"})
		if out := ta.out.String(); !strings.Contains(out, c.want) {
			t.Errorf("plan lacks %q:\n%s", c.want, out)
		}
		b, err := json.Marshal(spec)
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf(`"crypt":{"cipher":%q,"key_bytes":%d,"sector_size":512},"old_crypt":{"cipher":"aes-xts-plain64","key_bytes":64,"sector_size":512}`, c.crypt.Cipher, c.crypt.KeyBytes)
		if !strings.Contains(string(b), want) {
			t.Errorf("JSON plan lacks %s:\n%s", want, b)
		}
	}
}

// A plain rekey's plan says the data is rewritten in place and where the
// new key goes; its end prints the crypttab line that opens the volume as
// it is now: a plain line with the new key file, or (plain to LUKS2) a
// luks line with the detached header.
func TestPlainRekeyPlanAndEnd(t *testing.T) {
	p, err := convert.BuildPlainRekey(convert.PlainRekeyGeometry{DiskSize: 65536, Offset: 0, Size: 65536, Chunk: 2048, Align: 1})
	if err != nil {
		t.Fatal(err)
	}
	cs := convert.CryptSpec{Cipher: "aes-xts-plain64", KeyBytes: 64, SectorSize: 512}
	for _, c := range []struct {
		spec      convert.Spec
		plan, end []string
	}{
		{convert.Spec{NewKeyFile: "/root/vdb.key"},
			[]string{"rewritten in place under a new random key, 1.0 MiB at a time", "do not let crypttab open this volume at boot"},
			[]string{"vdb_crypt /dev/vdb /root/vdb.key plain,cipher=aes-xts-plain64,size=512", "no longer open the volume"}},
		{convert.Spec{HeaderFile: "/root/vdb.hdr", PlainTo: "luks2", LUKSUUID: "0b8e2c3e-9c7e-4a51-8d35-8e2b9d1c7f00"},
			[]string{"new header:    LUKS2 (UUID 0b8e2c3e-9c7e-4a51-8d35-8e2b9d1c7f00), detached"},
			[]string{"vdb_crypt /dev/vdb none luks,header=/root/vdb.hdr", "cryptsetup open --header /root/vdb.hdr /dev/vdb vdb_crypt"}},
	} {
		spec := c.spec
		spec.Op, spec.Disk, spec.Name, spec.Crypt, spec.OldCrypt, spec.Forward = "rekey", convert.DiskInfo{Path: "/dev/vdb"}, "vdb_crypt", cs, cs, p
		ta := newTestApp(t)
		ta.a.printPlainRekeyPlan(&convert.EncryptPlan{Spec: &spec, Journal: "/j"})
		ta.a.finishRekey(&result{}, &spec)
		out := ta.out.String()
		for _, w := range append(c.plan, c.end...) {
			if !strings.Contains(out, w) {
				t.Errorf("output lacks %q:\n%s", w, out)
			}
		}
	}
}
