package testvm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// cpioEntry is what readCPIO (an independent reader of the newc format,
// written from the format description) finds in an archive.
type cpioEntry struct {
	name  string
	mode  uint32
	nlink uint32
	data  string
}

func readCPIO(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	field := func(hdr []byte, i int) uint32 {
		v, err := strconv.ParseUint(string(hdr[6+8*i:6+8*i+8]), 16, 32)
		if err != nil {
			t.Fatalf("header field %d %q: %v", i, hdr[6+8*i:6+8*i+8], err)
		}
		return uint32(v)
	}
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if off%4 != 0 {
			t.Fatalf("entry at offset %d is not 4-byte aligned", off)
		}
		if len(b) < off+110 {
			t.Fatalf("truncated archive at %d", off)
		}
		hdr := b[off : off+110]
		if string(hdr[:6]) != "070701" {
			t.Fatalf("bad magic %q at %d", hdr[:6], off)
		}
		namesize := int(field(hdr, 11))
		size := int(field(hdr, 6))
		name := string(b[off+110 : off+110+namesize-1])
		if b[off+110+namesize-1] != 0 {
			t.Fatalf("%s: name not NUL-terminated", name)
		}
		dataOff := align(off + 110 + namesize)
		e := cpioEntry{name: name, mode: field(hdr, 1), nlink: field(hdr, 4), data: string(b[dataOff : dataOff+size])}
		off = align(dataOff + size)
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
		out = append(out, e)
	}
}

func TestCPIO(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "host-file")
	if err := os.WriteFile(src, []byte("from the host, 29 bytes long\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tr := tree{}
	tr.dir("etc")
	tr.data("etc/a", 0o644, []byte("a"))   // 1 byte: 3 bytes of padding
	tr.data("etc/abcd", 0o600, []byte("")) // empty
	tr.data("etc-x", 0o644, []byte("sorted between etc and etc/..."))
	tr.file("usr/bin/tool", 0o755, src) // parents created implicitly
	tr.symlink("bin", "usr/bin")
	tr.data("init", 0o755, []byte("#!/bin/sh\n"))
	var buf bytes.Buffer
	if err := tr.writeCPIO(&buf); err != nil {
		t.Fatal(err)
	}
	got := readCPIO(t, buf.Bytes())
	want := []cpioEntry{
		{"bin", sIFLNK | 0o777, 1, "usr/bin"},
		{"etc", sIFDIR | 0o755, 2, ""},
		{"etc/a", sIFREG | 0o644, 1, "a"},
		{"etc/abcd", sIFREG | 0o600, 1, ""},
		{"etc-x", sIFREG | 0o644, 1, "sorted between etc and etc/..."},
		{"init", sIFREG | 0o755, 1, "#!/bin/sh\n"},
		{"usr", sIFDIR | 0o755, 2, ""},
		{"usr/bin", sIFDIR | 0o755, 2, ""},
		{"usr/bin/tool", sIFREG | 0o755, 1, "from the host, 29 bytes long\n"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("archive holds\n%+v\nwant\n%+v", got, want)
	}
	// every directory comes before what it contains
	seen := map[string]bool{}
	for _, e := range got {
		if d := filepath.Dir(e.name); d != "." && !seen[d] {
			t.Errorf("%s comes before its directory %s", e.name, d)
		}
		seen[e.name] = true
	}
	// the same tree gives the same bytes
	var again bytes.Buffer
	if err := tr.writeCPIO(&again); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), again.Bytes()) {
		t.Error("writing the same tree twice gave different archives")
	}

	// Differential check against GNU cpio, when the host has it.
	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("GNU cpio not installed: differential check not run")
	}
	out := filepath.Join(dir, "x")
	os.Mkdir(out, 0o755)
	cmd := exec.Command(cpio, "-idm", "--quiet", "--no-absolute-filenames")
	cmd.Dir = out
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	if o, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v\n%s", err, o)
	}
	if b, err := os.ReadFile(filepath.Join(out, "bin", "tool")); err != nil || string(b) != "from the host, 29 bytes long\n" {
		t.Errorf("cpio extracted bin/tool (through the symlink) = %q, %v", b, err)
	}
	if st, err := os.Stat(filepath.Join(out, "etc", "abcd")); err != nil || st.Mode().Perm() != 0o600 || st.Size() != 0 {
		t.Errorf("cpio extracted etc/abcd: %v %v", st, err)
	}
	if l, err := os.Readlink(filepath.Join(out, "bin")); err != nil || l != "usr/bin" {
		t.Errorf("bin -> %q, %v", l, err)
	}
}

func TestCPIOMissingSource(t *testing.T) {
	tr := tree{}
	tr.file("x", 0o644, filepath.Join(t.TempDir(), "missing"))
	err := tr.writeCPIO(io.Discard)
	if err == nil || !strings.Contains(err.Error(), "x") {
		t.Fatalf("err = %v, want an error naming the entry", err)
	}
}

func TestDiskNames(t *testing.T) {
	got := guestDiskNames(28)
	for i, want := range map[int]string{0: "/dev/vda", 1: "/dev/vdb", 25: "/dev/vdz", 26: "/dev/vdaa", 27: "/dev/vdab"} {
		if got[i] != want {
			t.Errorf("disk %d: %s, want %s", i, got[i], want)
		}
	}
}

func TestEnvHelpers(t *testing.T) {
	t.Setenv(EnvGuest, "")
	t.Setenv(EnvGuestDisks, "")
	if InGuest() || GuestDisks() != nil || GuestFile("x") != "" {
		t.Fatal("guest helpers on the host should report nothing")
	}
	t.Setenv(EnvGuest, "1")
	t.Setenv(EnvGuestDisks, "/dev/vda,/dev/vdb")
	t.Setenv(EnvGuestShare, "/share")
	if !InGuest() || !reflect.DeepEqual(GuestDisks(), []string{"/dev/vda", "/dev/vdb"}) || GuestFile("bin/x") != "/run/testvm/files/bin/x" {
		t.Fatalf("guest helpers: %v %v %q", InGuest(), GuestDisks(), GuestFile("bin/x"))
	}
	t.Setenv(EnvVM, "1")
	if !VMRequested() {
		t.Fatal("VMRequested")
	}
}

// TestShellQuote checks the quoting against bash itself.
func TestShellQuote(t *testing.T) {
	for _, s := range []string{"", "plain", "it's", `"$HOME" $(id) \n`, "a\nb", "'''"} {
		out, err := exec.Command("bash", "-c", "printf %s "+shellQuote(s)).Output()
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != s {
			t.Errorf("bash read %q back as %q", s, out)
		}
	}
}

func TestQemuArgs(t *testing.T) {
	cfg := Config{
		Image: &Image{Kernel: "/c/vmlinux", Initrd: "/c/initramfs.cpio"},
		Disks: []string{"/d/a.img", "/d/b,c.img"}, Share: "/s/x,y",
		MemMiB: 1024, SMP: 2, DiskCache: "none", Append: "foo=1",
	}
	args := strings.Join(qemuArgs(cfg), " ")
	for _, want := range []string{
		"-accel tcg,thread=multi", "-M q35", "-cpu max,-erms,-fsrm", "-smp 2", "-m 1024", "-no-reboot",
		"-kernel /c/vmlinux", "-initrd /c/initramfs.cpio",
		"-append console=ttyS0 quiet loglevel=4 panic=-1 oops=panic foo=1",
		"-virtfs local,path=/s/x,,y,mount_tag=testvm,security_model=none,id=testvm",
		"-drive file=/d/a.img,format=raw,if=none,id=disk0,cache=none -device virtio-blk-pci,drive=disk0 -drive file=/d/b,,c.img,format=raw,if=none,id=disk1,cache=none -device virtio-blk-pci,drive=disk1",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("qemu args lack %q:\n%s", want, args)
		}
	}
	if strings.Contains(args, "kvm") {
		t.Errorf("qemu args mention kvm: %s", args)
	}
	cfg.BlockSizes = []int{0, 4096}
	args = strings.Join(qemuArgs(cfg), " ")
	if want := "-device virtio-blk-pci,drive=disk0 -drive file=/d/b,,c.img,format=raw,if=none,id=disk1,cache=none -device virtio-blk-pci,drive=disk1,logical_block_size=4096,physical_block_size=4096"; !strings.Contains(args, want) {
		t.Errorf("qemu args of a 4Kn disk lack %q:\n%s", want, args)
	}
	vm := &VM{args: qemuArgs(cfg)}
	if cl := vm.CommandLine(); !strings.Contains(cl, "'console=ttyS0 quiet loglevel=4 panic=-1 oops=panic foo=1'") {
		t.Errorf("command line not shell-quoted: %s", cl)
	}
}

func TestStripModule(t *testing.T) {
	dir := t.TempDir()
	body := []byte("\x7fELF module body")
	sig := bytes.Repeat([]byte{0xab}, 300)
	info := make([]byte, 12)
	info[2] = 2 // PKEY_ID_PKCS7
	binary.BigEndian.PutUint32(info[8:], uint32(len(sig)))
	signed := append(append(append(append([]byte{}, body...), sig...), info...), moduleSigMagic...)
	for name, in := range map[string][]byte{"signed.ko": signed, "plain.ko": body} {
		src, dst := filepath.Join(dir, name), filepath.Join(dir, "out", name)
		if err := os.WriteFile(src, in, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := stripModule(src, dst); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(dst)
		if !bytes.Equal(got, body) {
			t.Errorf("%s stripped to %q, want %q", name, got, body)
		}
	}
}

func TestHostToGuestPath(t *testing.T) {
	for in, want := range map[string]string{
		"/lib/x86_64-linux-gnu": "usr/lib/x86_64-linux-gnu", "/lib64": "usr/lib64", "/sbin": "usr/sbin",
		"/usr/sbin": "usr/sbin", "/bin": "usr/bin", "/library": "library",
	} {
		if got := guestPath(in); got != want {
			t.Errorf("guestPath(%s) = %s, want %s", in, got, want)
		}
	}
}

func TestInputHash(t *testing.T) {
	k := kernelRef{"linux-image-x", "1"}
	tr := tree{}
	tr.data("init", 0o755, []byte("a"))
	h1, err := inputHash(k, tr)
	if err != nil {
		t.Fatal(err)
	}
	h2, _ := inputHash(k, tr)
	tr.data("init", 0o755, []byte("b"))
	h3, _ := inputHash(k, tr)
	h4, _ := inputHash(kernelRef{"linux-image-x", "2"}, tr)
	if h1 != h2 || h1 == h3 || h3 == h4 {
		t.Fatalf("hashes: same input %v, changed file %v, changed kernel %v", h1 == h2, h1 != h3, h3 != h4)
	}
}

// TestSummarize feeds real test2json output of a tiny test binary (built
// and run here) through summarize and the report counters.
func TestSummarize(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a test binary")
	}
	dir := t.TempDir()
	files := map[string]string{
		"go.mod": "module sample\n\ngo 1.21\n",
		"s_test.go": `package sample
import "testing"
func TestGuestPass(t *testing.T) { t.Log("fine"); t.Run("sub", func(t *testing.T) {}) }
func TestGuestSkip(t *testing.T) { t.Skip("no kernel") }
func TestGuestFail(t *testing.T) { t.Error("broken") }
func TestGuestSubSkip(t *testing.T) { t.Run("a", func(t *testing.T) { t.Skip("x") }) }
`,
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(dir, "s.test")
	if out, err := goCombined(t.Context(), dir, "test", "-c", "-o", bin); err != nil {
		t.Fatalf("go test -c: %v\n%s", err, out)
	}
	raw, _ := exec.Command(bin, "-test.v=test2json", "-test.run", "^TestGuest").CombinedOutput()
	evs, err := test2json(t.Context(), "sample", raw)
	if err != nil {
		t.Fatal(err)
	}
	results, pkgOut := summarize(evs)
	var got []string
	for _, r := range results {
		got = append(got, fmt.Sprintf("%s:%s:%d", r.Name, r.Action, len(r.Skips)))
	}
	sort.Strings(got)
	want := []string{"TestGuestFail:fail:0", "TestGuestPass:pass:0", "TestGuestSkip:skip:0", "TestGuestSubSkip:pass:1"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("results %v, want %v", got, want)
	}
	for _, r := range results {
		if r.Name == "TestGuestFail" && !strings.Contains(r.Output, "broken") {
			t.Errorf("TestGuestFail output %q lacks the error", r.Output)
		}
	}
	if !strings.Contains(pkgOut, "FAIL") {
		t.Errorf("package output %q", pkgOut)
	}
	var rep Report
	rep.count(results)
	if rep.Ran != 4 || rep.Passed != 1 || rep.Failed != 1 || rep.Skipped != 2 {
		t.Fatalf("counts %+v", rep)
	}

	// reports round-trip through a directory
	rep.Package, rep.Test = "example.com/p", "TestVM"
	rdir := t.TempDir()
	if err := rep.write(rdir); err != nil {
		t.Fatal(err)
	}
	back, err := ReadReports(rdir)
	if err != nil || len(back) != 1 || !reflect.DeepEqual(back[0], rep) {
		t.Fatalf("ReadReports = %+v, %v", back, err)
	}
}

func TestDeclaredGuestTests(t *testing.T) {
	root := t.TempDir()
	files := map[string]string{
		"go.mod":               "module example.com/m\n\ngo 1.21\n",
		"a/a_test.go":          "package a\nimport \"testing\"\nfunc TestGuestOne(t *testing.T) {}\nfunc TestGuestTwo(t *testing.T) {}\nfunc TestHost(t *testing.T) {}\n",
		"a/b/b_test.go":        "package b\nimport \"testing\"\ntype x struct{}\nfunc (x) TestGuestMethod() {}\nfunc TestGuestB(t *testing.T) {}\n",
		"a/testdata/t_test.go": "package t\nimport \"testing\"\nfunc TestGuestIgnored(t *testing.T) {}\n",
		"c/c.go":               "package c\nfunc TestGuestNotATestFile() {}\n",
		"sub/go.mod":           "module example.com/other\n",
		"sub/s_test.go":        "package s\nimport \"testing\"\nfunc TestGuestOtherModule(t *testing.T) {}\n",
	}
	for name, content := range files {
		p := filepath.Join(root, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := DeclaredGuestTests(root)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"example.com/m/a":   {"TestGuestOne", "TestGuestTwo"},
		"example.com/m/a/b": {"TestGuestB"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("DeclaredGuestTests = %v, want %v", got, want)
	}
	reps := []Report{{Package: "example.com/m/a", Tests: []string{"TestGuestOne"}}, {Package: "example.com/m/a", Tests: []string{"TestGuestTwo"}}}
	if m := MissingGuestTests(got, reps); !reflect.DeepEqual(m, []string{"example.com/m/a/b.TestGuestB"}) {
		t.Fatalf("MissingGuestTests = %v", m)
	}
}

// Two running VMs on one share would run each other's scripts (the power
// cut test once did): the second claim is refused until the first ends.
func TestShareClaimedOnce(t *testing.T) {
	dir := t.TempDir()
	if err := claimShare(dir); err != nil {
		t.Fatal(err)
	}
	if err := claimShare(dir); err == nil {
		t.Fatal("a share in use was claimed again")
	}
	vm := &VM{claimed: dir}
	vm.cleanup()
	if err := claimShare(dir); err != nil {
		t.Fatalf("after the VM ended: %v", err)
	}
	(&VM{claimed: dir}).cleanup()
}

// A host test that boots twice (convert's TestVM: convert, then a fresh
// boot) leaves two reports, and the guest tests of both count as run.
func TestReportsOfTwoBootsOfOneTest(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"TestGuestA", "TestGuestB"} {
		if err := (Report{Package: "example.com/p", Test: "TestVM", Ran: 1, Passed: 1, Tests: []string{name}}).write(dir); err != nil {
			t.Fatal(err)
		}
	}
	reps, err := ReadReports(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(reps) != 2 {
		t.Fatalf("%d reports, want 2", len(reps))
	}
	if m := MissingGuestTests(map[string][]string{"example.com/p": {"TestGuestA", "TestGuestB"}}, reps); len(m) != 0 {
		t.Fatalf("missing %v although both ran", m)
	}
}

// TestQueueLowestRankFirst: callers that arrive in any order get the
// slots lowest rank first, never more than the queue's slots at once.
func TestQueueLowestRankFirst(t *testing.T) {
	q := NewQueue(2, 50*time.Millisecond)
	var mu sync.Mutex
	var order []int
	running, most := 0, 0
	var wg sync.WaitGroup
	for _, rank := range []int{4, 1, 3, 0, 2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			release := q.Wait(rank)
			defer release()
			mu.Lock()
			order = append(order, rank)
			running++
			most = max(most, running)
			mu.Unlock()
			// Rank r holds its slot (r+1)*20 ms: the next grants come
			// 20 ms or more apart.
			time.Sleep(time.Duration(rank+1) * 20 * time.Millisecond)
			mu.Lock()
			running--
			mu.Unlock()
		}()
	}
	wg.Wait()
	if most != 2 {
		t.Errorf("%d callers held a slot at once, want 2", most)
	}
	// The first two granted are ranks 0 and 1 (in either order: both
	// are granted together); then 2, 3, 4 as slots free.
	if len(order) != 5 || order[0]+order[1] != 1 || order[2] != 2 || order[3] != 3 || order[4] != 4 {
		t.Errorf("grant order %v, want 0 and 1, then 2, 3, 4", order)
	}
}
