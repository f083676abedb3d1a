//go:build linux

package dmtable

// Real-kernel tests. They run inside the test VM (testvm), where the
// kernel has device-mapper, dmsetup is installed and udev is not running.
// Most are differential: what we create is read back with dmsetup, and
// what dmsetup creates is read back with the Client.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dmconvert/dmconvert/testvm"
)

// guestDiskSize is the size of each virtio disk TestVM attaches.
const guestDiskSize = 64 << 20

func TestVM(t *testing.T) {
	testvm.RunTestsInGuest(t, testvm.Options{
		Disks: []testvm.Disk{{Size: guestDiskSize}, {Size: guestDiskSize}},
	})
}

// guestSetup returns a Client (udev off, as in the VM) and the device
// numbers of the two disks.
func guestSetup(t testing.TB) (*Client, Dev, Dev) {
	testvm.RequireGuest(t)
	disks := testvm.GuestDisks()
	if len(disks) < 2 {
		t.Fatalf("want 2 guest disks, have %v", disks)
	}
	c, err := Open(Options{Udev: UdevOff})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, devOf(t, disks[0]), devOf(t, disks[1])
}

func devOf(t testing.TB, path string) Dev {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return Dev{Major: unix.Major(st.Rdev), Minor: unix.Minor(st.Rdev)}
}

// dmsetup runs the reference tool and returns its output, failing the
// test on error.
func dmsetup(t testing.TB, args ...string) string {
	t.Helper()
	out, err := dmsetupErr(args...)
	if err != nil {
		t.Fatalf("dmsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func dmsetupErr(args ...string) (string, error) {
	cmd := exec.Command("dmsetup", args...)
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := cmd.Run()
	return b.String(), err
}

// cleanupDevice removes name at the end of the test if it still exists.
func cleanupDevice(t testing.TB, c *Client, name string) {
	t.Cleanup(func() {
		if _, err := c.Info(name); errors.Is(err, ErrNotFound) {
			return
		}
		c.Resume(name)
		if err := c.Remove(name); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
}

// dmsetupLines splits dmsetup table/status output into lines without the
// trailing space dmsetup prints after an empty parameter list.
func dmsetupLines(out string) []string {
	var l []string
	for _, s := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		l = append(l, strings.TrimRight(s, " "))
	}
	return l
}

func randomKey(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestGuestVersionAndTargets(t *testing.T) {
	c, _, _ := guestSetup(t)
	v, err := c.Version()
	if err != nil {
		t.Fatal(err)
	}
	out := dmsetup(t, "version")
	want := fmt.Sprintf("Driver version:    %d.%d.%d", v[0], v[1], v[2])
	if !strings.Contains(out, want) {
		t.Fatalf("our version %v, dmsetup says:\n%s", v, out)
	}
	t.Logf("dm ioctl interface %d.%d.%d", v[0], v[1], v[2])

	// Load the modules we need (DM_GET_TARGET_VERSION loads on demand).
	for _, typ := range []string{"linear", "striped", "crypt", "mirror", "error", "zero"} {
		tv, err := c.TargetVersion(typ)
		if err != nil {
			t.Fatalf("TargetVersion(%s): %v", typ, err)
		}
		if tv.Name != typ {
			t.Fatalf("TargetVersion(%s) = %v", typ, tv)
		}
	}
	if _, err := c.TargetVersion("no-such-target"); !errors.Is(err, ErrInvalid) || !errors.Is(err, unix.EINVAL) {
		t.Fatalf("TargetVersion(no-such-target): %v, want ErrInvalid", err)
	}

	// `dmsetup targets` prints "<name> v<maj>.<min>.<patch>" per target.
	var ref []string
	for _, l := range strings.Split(strings.TrimSpace(dmsetup(t, "targets")), "\n") {
		f := strings.Fields(l)
		if len(f) == 2 {
			ref = append(ref, f[0]+" "+f[1])
		}
	}
	vs, err := c.TargetVersions()
	if err != nil {
		t.Fatal(err)
	}
	var ours []string
	for _, tv := range vs {
		ours = append(ours, tv.String())
	}
	sort.Strings(ref)
	sort.Strings(ours)
	if strings.Join(ref, "\n") != strings.Join(ours, "\n") {
		t.Fatalf("target versions differ:\nours:\n%s\ndmsetup:\n%s", strings.Join(ours, "\n"), strings.Join(ref, "\n"))
	}
	t.Logf("%d target types: %s", len(ours), strings.Join(ours, ", "))
}

// diffCase is a table built with the Client and read back with dmsetup.
type diffCase struct {
	name  string
	table string // Payload form; A and B are replaced by the disks' numbers, L by the log device
	setup func(t *testing.T) func()
}

func TestGuestDifferentialTables(t *testing.T) {
	c, a, b := guestSetup(t)
	key64 := fmt.Sprintf("%x", randomKey(t, 64))
	key32 := fmt.Sprintf("%x", randomKey(t, 32))

	// A small linear device to hold a disk mirror log.
	logName := "dmt-mirrorlog"
	logInfo, err := c.CreateWithTable(logName, "", mustTable(t, fmt.Sprintf("0 2048 linear %s 120000", b)))
	if err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, logName)

	cases := []diffCase{
		{name: "linear", table: "0 131072 linear A 0"},
		{name: "linear2", table: "0 8192 linear A 0\n8192 8192 linear B 8192"},
		{name: "striped", table: "0 16384 striped 2 128 A 0 B 0"},
		{name: "crypt", table: "0 16384 crypt aes-xts-plain64 " + key64 + " 0 A 0"},
		{name: "crypt-options", table: "0 16384 crypt aes-xts-plain64 " + key64 + " 0 A 0 5 allow_discards same_cpu_crypt submit_from_crypt_cpus no_read_workqueue no_write_workqueue"},
		{name: "crypt-4k", table: "0 16384 crypt aes-xts-plain64 " + key64 + " 0 A 0 2 sector_size:4096 iv_large_sectors"},
		{name: "crypt-capi", table: "0 16384 crypt capi:xts(aes)-plain64 " + key64 + " 16 A 32 1 allow_discards"},
		// (essiv is not in the test kernel's initramfs: ENOENT, see TestGuestTypedErrors.)
		{name: "crypt-cbc", table: "0 16384 crypt aes-cbc-plain64 " + key32 + " 0 A 0"},
		{name: "crypt-keyring", table: "0 16384 crypt aes-xts-plain64 :64:logon:dmtable:guest-test 0 A 0",
			setup: func(t *testing.T) func() {
				id, err := unix.AddKey("logon", "dmtable:guest-test", randomKey(t, 64), unix.KEY_SPEC_USER_KEYRING)
				if err != nil {
					t.Fatalf("add_key: %v", err)
				}
				return func() { unix.KeyctlInt(unix.KEYCTL_INVALIDATE, id, 0, 0, 0) }
			}},
		{name: "mirror-core", table: "0 32768 mirror core 1 1024 2 A 0 B 0"},
		{name: "mirror-nosync", table: "0 32768 mirror core 2 1024 nosync 2 A 0 B 32768"},
		{name: "mirror-sync-handle-errors", table: "0 32768 mirror core 2 1024 sync 2 A 0 B 0 1 handle_errors"},
		{name: "mirror-disk-log", table: "0 32768 mirror disk 2 L 1024 2 A 0 B 0 2 handle_errors keep_log"},
		{name: "error", table: "0 2048 error"},
		{name: "zero", table: "0 2048 zero"},
		{name: "mixed", table: "0 1024 linear A 0\n1024 1024 zero\n2048 1024 error"},
	}
	repl := strings.NewReplacer("A", a.String(), "B", b.String(), "L", logInfo.Dev.String())
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.setup != nil {
				defer tc.setup(t)()
			}
			text := tc.table
			// Replace the placeholders only in device fields.
			var lines []string
			for _, l := range strings.Split(text, "\n") {
				f := strings.Fields(l)
				for i := range f {
					if f[i] == "A" || f[i] == "B" || f[i] == "L" {
						f[i] = repl.Replace(f[i])
					}
				}
				lines = append(lines, strings.Join(f, " "))
			}
			tbl := mustTable(t, strings.Join(lines, "\n"))
			if err := tbl.Validate(); err != nil {
				t.Fatalf("model refuses the table: %v", err)
			}
			name := "dmt-" + tc.name
			info, err := c.CreateWithTable(name, "DMT-"+tc.name, tbl)
			if err != nil {
				t.Fatalf("CreateWithTable: %v", err)
			}
			cleanupDevice(t, c, name)
			checkAgainstDmsetup(t, c, name, tbl, info)
			if err := c.Remove(name); err != nil {
				t.Fatalf("Remove: %v", err)
			}
			if out, err := dmsetupErr("info", name); err == nil {
				t.Fatalf("dmsetup still sees %s after Remove:\n%s", name, out)
			}
		})
	}
}

func mustTable(t testing.TB, s string) Table {
	t.Helper()
	tbl, err := ParseTable(s)
	if err != nil {
		t.Fatalf("ParseTable: %v", err)
	}
	return tbl
}

var depRe = regexp.MustCompile(`\((\d+), (\d+)\)`)

// checkAgainstDmsetup compares every view of a live device: table with
// and without keys, status, info, deps, list.
func checkAgainstDmsetup(t *testing.T, c *Client, name string, tbl Table, info Info) {
	t.Helper()
	// Table with keys: the kernel prints exactly our payload.
	shown := dmsetupLines(dmsetup(t, "table", "--showkeys", name))
	if got := strings.Join(shown, "\n"); got != tbl.Payload() {
		t.Errorf("dmsetup table --showkeys:\n%s\nwant:\n%s", got, tbl.Payload())
	}
	// Without --showkeys dmsetup masks hex keys exactly as String does.
	masked := dmsetupLines(dmsetup(t, "table", name))
	if got := strings.Join(masked, "\n"); got != tbl.String() {
		t.Errorf("dmsetup table:\n%s\nwant:\n%s", got, tbl.String())
	}
	for _, l := range masked {
		t.Logf("kernel line: %s", l)
	}
	// Our own read-back.
	back, err := c.Table(name)
	if err != nil {
		t.Fatalf("Table: %v", err)
	}
	if !back.Equal(tbl) || back.Payload() != tbl.Payload() {
		t.Errorf("Client.Table:\n%s\nwant:\n%s", back.Payload(), tbl.Payload())
	}
	// Each line dmsetup printed parses and prints back identically.
	for _, l := range shown {
		tg, err := Parse(l)
		if err != nil {
			t.Errorf("Parse(%q): %v", l, err)
		} else if tg.Payload() != l {
			t.Errorf("Parse(%q).Payload() = %q", l, tg.Payload())
		}
	}
	// Status.
	st, err := c.Status(name)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	var ours []string
	for _, s := range st {
		ours = append(ours, s.String())
	}
	ref := dmsetupLines(dmsetup(t, "status", name))
	if strings.Join(ours, "\n") != strings.Join(ref, "\n") {
		// A mirror may progress between the two reads: compare the
		// shape, then re-read once.
		st2, _ := c.Status(name)
		ref2 := dmsetupLines(dmsetup(t, "status", name))
		var ours2 []string
		for _, s := range st2 {
			ours2 = append(ours2, s.String())
		}
		if strings.Join(ours2, "\n") != strings.Join(ref2, "\n") && !mirrorProgressOnly(ours2, ref2) {
			t.Errorf("status:\nours:\n%s\ndmsetup:\n%s", strings.Join(ours2, "\n"), strings.Join(ref2, "\n"))
		}
	}
	for _, l := range ref {
		t.Logf("kernel status: %s", l)
		if _, err := ParseStatus(l); err != nil {
			t.Errorf("ParseStatus(%q): %v", l, err)
		}
	}
	// Info: name, uuid, major, minor, open count, events, attributes, targets.
	in, err := c.Info(name)
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	if in.Dev != info.Dev || in.Name != name {
		t.Errorf("Info %+v vs create answer %+v", in, info)
	}
	f := strings.Split(strings.TrimSpace(dmsetup(t, "info", "-c", "--noheadings", "--separator", "|",
		"-o", "name,uuid,major,minor,open,segments,attr", name)), "|")
	if len(f) != 7 {
		t.Fatalf("dmsetup info: %q", f)
	}
	attr := fmt.Sprintf("%s%s%s%s",
		pick(in.LivePresent, "L", "-"), pick(in.InactivePresent, "I", "-"), pick(in.Suspended, "s", "-"), pick(in.ReadOnly, "r", "w"))
	wantInfo := []string{in.Name, in.UUID, strconv.Itoa(int(in.Dev.Major)), strconv.Itoa(int(in.Dev.Minor)),
		strconv.Itoa(int(in.OpenCount)), strconv.Itoa(int(in.TargetCount)), attr}
	if strings.Join(f, "|") != strings.Join(wantInfo, "|") {
		t.Errorf("dmsetup info %q, ours %q", f, wantInfo)
	}
	// Events: dmsetup's event count against ours (a mirror may raise one
	// between the reads, so re-read ours after).
	ev := strings.TrimSpace(dmsetup(t, "info", "-c", "--noheadings", "-o", "events", name))
	in2, _ := c.Info(name)
	if ev != strconv.Itoa(int(in.EventNr)) && ev != strconv.Itoa(int(in2.EventNr)) {
		t.Errorf("events: dmsetup %s, ours %d/%d", ev, in.EventNr, in2.EventNr)
	}
	// Deps.
	deps, err := c.Deps(name)
	if err != nil {
		t.Fatalf("Deps: %v", err)
	}
	var refDeps []string
	for _, m := range depRe.FindAllStringSubmatch(dmsetup(t, "deps", "-o", "devno", name), -1) {
		refDeps = append(refDeps, m[1]+":"+m[2])
	}
	var ourDeps []string
	for _, d := range deps {
		ourDeps = append(ourDeps, d.String())
	}
	sort.Strings(refDeps)
	sort.Strings(ourDeps)
	if strings.Join(refDeps, " ") != strings.Join(ourDeps, " ") {
		t.Errorf("deps: dmsetup %v, ours %v", refDeps, ourDeps)
	}
	// The table's devices are the deps.
	var tblDevs []string
	for _, d := range tbl.Devices() {
		tblDevs = append(tblDevs, d.String())
	}
	sort.Strings(tblDevs)
	if strings.Join(tblDevs, " ") != strings.Join(ourDeps, " ") {
		t.Errorf("table devices %v, deps %v", tblDevs, ourDeps)
	}
	// List.
	l, err := c.List()
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	found := false
	for _, e := range l {
		if e.Name == name {
			found = true
			if e.Dev != in.Dev || !e.HasUUIDInfo || e.UUID != in.UUID {
				t.Errorf("List entry %+v, info %+v", e, in)
			}
		}
	}
	if !found {
		t.Errorf("List does not show %s: %+v", name, l)
	}
	// The node we made without udev.
	checkNode(t, c, name, in.Dev)
}

func mirrorProgressOnly(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		sa, ea := ParseStatus(a[i])
		sb, eb := ParseStatus(b[i])
		if ea != nil || eb != nil || sa.TargetType != sb.TargetType {
			return false
		}
		if a[i] != b[i] && sa.Mirror == nil {
			return false
		}
	}
	return true
}

func pick(b bool, yes, no string) string {
	if b {
		return yes
	}
	return no
}

func checkNode(t testing.TB, c *Client, name string, d Dev) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(c.NodePath(name), &st); err != nil {
		t.Errorf("node %s: %v", c.NodePath(name), err)
		return
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || st.Rdev != unix.Mkdev(d.Major, d.Minor) {
		t.Errorf("node %s: mode %o rdev %d:%d, want block %s", c.NodePath(name), st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev), d)
	}
}

func checkNoNode(t testing.TB, c *Client, name string) {
	t.Helper()
	if _, err := os.Lstat(c.NodePath(name)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("node %s still there (%v)", c.NodePath(name), err)
	}
}

func TestGuestReadsDmsetupDevices(t *testing.T) {
	c, a, b := guestSetup(t)
	key := fmt.Sprintf("%x", randomKey(t, 64))
	tables := map[string]string{
		"dmt-ref-linear": fmt.Sprintf("0 4096 linear %s 0\n4096 4096 linear %s 4096", a, b),
		"dmt-ref-crypt":  fmt.Sprintf("0 8192 crypt aes-xts-plain64 %s 0 %s 8192 1 allow_discards", key, a),
		"dmt-ref-mirror": fmt.Sprintf("0 8192 mirror core 1 256 2 %s 16384 %s 16384", a, b),
	}
	for name, text := range tables {
		dmsetup(t, "create", name, "-u", "REF-"+name, "--table", text)
		cleanupDevice(t, c, name)
	}
	l, err := c.List()
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]DeviceEntry{}
	for _, e := range l {
		byName[e.Name] = e
	}
	// Compare the whole list with dmsetup's.
	out := dmsetup(t, "info", "-c", "--noheadings", "--separator", "|", "-o", "name,uuid,major,minor")
	n := 0
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Split(line, "|")
		if len(f) != 4 {
			continue
		}
		n++
		e, ok := byName[f[0]]
		if !ok {
			t.Errorf("List misses %s", f[0])
			continue
		}
		if e.UUID != f[1] || strconv.Itoa(int(e.Dev.Major)) != f[2] || strconv.Itoa(int(e.Dev.Minor)) != f[3] {
			t.Errorf("List entry %+v, dmsetup %q", e, f)
		}
	}
	if n != len(l) {
		t.Errorf("dmsetup lists %d devices, we %d", n, len(l))
	}
	for name, text := range tables {
		tbl, err := c.Table(name)
		if err != nil {
			t.Fatalf("Table(%s): %v", name, err)
		}
		if tbl.Payload() != text {
			t.Errorf("Table(%s):\n%s\nwant:\n%s", name, tbl.Payload(), text)
		}
		ref := mustTable(t, strings.Join(dmsetupLines(dmsetup(t, "table", "--showkeys", name)), "\n"))
		if !ref.Equal(tbl) {
			t.Errorf("Table(%s) differs from dmsetup's", name)
		}
		info, err := c.Info(name)
		if err != nil || info.UUID != "REF-"+name || !info.LivePresent || info.Suspended {
			t.Errorf("Info(%s) = %+v, %v", name, info, err)
		}
	}
	// A device dmsetup suspended and loaded.
	name := "dmt-ref-linear"
	dmsetup(t, "suspend", name)
	dmsetup(t, "load", name, "--table", fmt.Sprintf("0 8192 linear %s 0", b))
	info, err := c.Info(name)
	if err != nil || !info.Suspended || !info.InactivePresent {
		t.Fatalf("Info after dmsetup suspend+load: %+v %v", info, err)
	}
	inact, err := c.InactiveTable(name)
	if err != nil || inact.Payload() != fmt.Sprintf("0 8192 linear %s 0", b) {
		t.Fatalf("InactiveTable: %q %v", inact.Payload(), err)
	}
	if _, err := c.Resume(name); err != nil {
		t.Fatal(err)
	}
	if tbl, _ := c.Table(name); tbl.Payload() != fmt.Sprintf("0 8192 linear %s 0", b) {
		t.Fatalf("after our resume: %q", tbl.Payload())
	}
	if out := dmsetup(t, "info", "-c", "--noheadings", "-o", "attr", name); strings.TrimSpace(out) != "L--w" {
		t.Fatalf("dmsetup attr after our resume: %q", out)
	}
	for n := range tables {
		if err := c.Remove(n); err != nil {
			t.Fatalf("Remove(%s): %v", n, err)
		}
		if _, err := dmsetupErr("info", n); err == nil {
			t.Fatalf("dmsetup still sees %s", n)
		}
		checkNoNode(t, c, n)
	}
}

// writePattern fills [off, off+n) sectors of path with a pattern and
// returns it.
func writePattern(t testing.TB, path string, off, n Sectors) []byte {
	t.Helper()
	buf := randomKey(t, int(n.Bytes()))
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(buf, int64(off.Bytes())); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return buf
}

func readDirect(t testing.TB, path string, off, n Sectors) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBuf(t, int(n.Bytes()))
	if _, err := f.ReadAt(buf, int64(off.Bytes())); err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf...)
}

func alignedBuf(t testing.TB, n int) []byte {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func TestGuestMirrorSync(t *testing.T) {
	c, a, b := guestSetup(t)
	disks := testvm.GuestDisks()
	const n = 32768 // 16 MiB
	pattern := writePattern(t, disks[0], 0, n)

	// The mirror copies leg 0 (vda) onto leg 1 (vdb).
	name := "dmt-mirror-sync"
	tbl := Table{{Start: 0, Length: n, Params: &Mirror{
		Log:  MirrorLog{Type: "core", RegionSize: 1024},
		Legs: []MirrorLeg{{Dev: a.Ref(), Offset: 0}, {Dev: b.Ref(), Offset: 0}},
	}}}
	if _, err := c.Create(name, ""); err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, name)
	if _, err := c.Load(name, tbl); err != nil {
		t.Fatal(err)
	}
	info, err := c.Resume(name)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	st, err := c.Status(name)
	if err != nil || len(st) != 1 || st[0].Mirror == nil {
		t.Fatalf("Status: %+v %v", st, err)
	}
	first := *st[0].Mirror
	t.Logf("right after resume (event %d): %s", info.EventNr, st[0])
	if first.Regions != 32 || len(first.Legs) != 2 {
		t.Fatalf("mirror status %+v", first)
	}

	// Wait for the completion event, not by polling.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ev := info.EventNr
	var synced MirrorStatus
	for {
		in, err := c.WaitEvent(ctx, name, ev)
		if err != nil {
			t.Fatalf("WaitEvent: %v", err)
		}
		ev = in.EventNr
		st, err := c.Status(name)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("event %d after %v: %s", ev, time.Since(start).Round(time.Millisecond), st[0])
		if st[0].Mirror.Synced() {
			synced = *st[0].Mirror
			break
		}
	}
	if synced.InSync != synced.Regions || synced.Health != "AA" {
		t.Fatalf("synced status %+v", synced)
	}
	if ref := dmsetupLines(dmsetup(t, "status", name)); ref[0] != fmt.Sprintf("0 %d mirror 2 %s %s 32/32 1 AA 1 core", n, a, b) {
		t.Fatalf("dmsetup status after the event: %q", ref[0])
	}
	if got := readDirect(t, disks[1], 0, n); !bytes.Equal(got, pattern) {
		t.Fatal("leg 1 does not hold leg 0's data after sync")
	}

	// The same through the blocking DM_DEV_WAIT, on a second mirror
	// (the other direction, a bigger region).
	name2 := "dmt-mirror-wait"
	pattern2 := writePattern(t, disks[1], 65536, n)
	tbl2 := Table{{Start: 0, Length: n, Params: &Mirror{
		Log:  MirrorLog{Type: "core", RegionSize: 8192},
		Legs: []MirrorLeg{{Dev: b.Ref(), Offset: 65536}, {Dev: a.Ref(), Offset: 65536}},
	}}}
	info2, err := c.CreateWithTable(name2, "", tbl2)
	if err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, name2)
	ev = info2.EventNr
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st, err := c.Status(name2)
		if err != nil {
			t.Fatal(err)
		}
		if st[0].Mirror.Synced() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no sync: %s", st[0])
		}
		done := make(chan error, 1)
		go func(ev uint32) {
			in, err := c.Wait(name2, ev)
			if err == nil && in.EventNr == ev {
				err = fmt.Errorf("Wait returned with the same event number %d", ev)
			}
			done <- err
		}(ev)
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(2 * time.Minute):
			t.Fatal("DM_DEV_WAIT did not return")
		}
		in, _ := c.Info(name2)
		ev = in.EventNr
	}
	if got := readDirect(t, disks[0], 65536, n); !bytes.Equal(got, pattern2) {
		t.Fatal("second mirror did not copy")
	}

	// WaitEvent on a device with no event coming returns on cancellation.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	in, _ := c.Info(name)
	t0 := time.Now()
	_, err = c.WaitEvent(ctx2, name, in.EventNr)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitEvent on an idle device: %v", err)
	}
	if d := time.Since(t0); d < 250*time.Millisecond || d > 5*time.Second {
		t.Fatalf("WaitEvent returned after %v", d)
	}
}

func TestGuestTypedErrors(t *testing.T) {
	c, a, _ := guestSetup(t)
	lin := mustTable(t, fmt.Sprintf("0 2048 linear %s 0", a))
	name := "dmt-errors"
	if _, err := c.CreateWithTable(name, "", lin); err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, name)

	// Duplicate name: the kernel answers EBUSY; it is ErrExists.
	_, err := c.Create(name, "")
	if !errors.Is(err, ErrExists) || !errors.Is(err, unix.EBUSY) || errors.Is(err, ErrBusy) {
		t.Errorf("duplicate create: %v", err)
	}
	var op *OpError
	if !errors.As(err, &op) || op.Op != "create" || op.Device != name {
		t.Errorf("duplicate create: not an OpError naming the device: %#v", err)
	}

	// Busy device on remove, while open (dmsetup fails the same way),
	// after Remove's retries (5 s).
	f, err := os.Open(c.NodePath(name))
	if err != nil {
		t.Fatal(err)
	}
	err = c.Remove(name)
	if !errors.Is(err, ErrBusy) || !errors.Is(err, unix.EBUSY) {
		t.Errorf("remove of an open device: %v", err)
	}
	if in, _ := c.Info(name); in.OpenCount != 1 {
		t.Errorf("open count %d, want 1", in.OpenCount)
	}
	if _, err := dmsetupErr("remove", name); err == nil {
		t.Errorf("dmsetup removed an open device")
	}
	// Deferred remove: marked now, gone when closed.
	removed, err := c.RemoveDeferred(name)
	if err != nil || removed {
		t.Fatalf("RemoveDeferred of an open device: %v %v", removed, err)
	}
	if in, err := c.Info(name); err != nil || !in.DeferredRemove {
		t.Fatalf("Info after deferred remove: %+v %v", in, err)
	}
	f.Close()
	gone := false
	for i := 0; i < 200 && !gone; i++ {
		_, err := c.Info(name)
		gone = errors.Is(err, ErrNotFound)
		time.Sleep(10 * time.Millisecond)
	}
	if !gone {
		t.Fatal("deferred remove did not happen on close")
	}

	// Open for a moment, as an lvm command's device scan (or udev's
	// blkid) opens it: Remove waits and removes it, udev or not.
	tr := "dmt-transient"
	if _, err := c.CreateWithTable(tr, "", lin); err != nil {
		t.Fatal(err)
	}
	g, err := os.Open(c.NodePath(tr))
	if err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(500 * time.Millisecond); g.Close() }()
	if err := c.Remove(tr); err != nil {
		t.Errorf("remove of a device open for 500 ms: %v", err)
	}

	// Not found.
	_, err = c.Info("dmt-no-such-device")
	if !errors.Is(err, ErrNotFound) || !errors.Is(err, unix.ENXIO) {
		t.Errorf("info of a missing device: %v", err)
	}
	if err := c.Remove("dmt-no-such-device"); !errors.Is(err, ErrNotFound) {
		t.Errorf("remove of a missing device: %v", err)
	}

	// Bad tables: the kernel refuses with EINVAL.
	if _, err := c.CreateWithTable(name, "", lin); err != nil {
		t.Fatal(err)
	}
	bad := map[string]string{
		"region not a power of two": fmt.Sprintf("0 32768 mirror core 1 3000 2 %s 0 %s 32768", a, a),
		"region above length":       fmt.Sprintf("0 32768 mirror core 1 65536 2 %s 0 %s 32768", a, a),
		"region 1":                  fmt.Sprintf("0 32768 mirror core 1 1 2 %s 0 %s 32768", a, a),
		"block_on_error":            fmt.Sprintf("0 32768 mirror core 2 1024 block_on_error 2 %s 0 %s 32768", a, a),
		"keep_log alone":            fmt.Sprintf("0 32768 mirror core 1 1024 2 %s 0 %s 32768 1 keep_log", a, a),
		"bad key size":              fmt.Sprintf("0 2048 crypt aes-xts-plain64 %s 0 %s 0", strings.Repeat("00", 7), a),
		"striped width":             fmt.Sprintf("0 100 striped 2 8 %s 0 %s 4096", a, a),
	}
	for what, text := range bad {
		tbl := mustTable(t, text)
		_, err := c.Load(name, tbl)
		if !errors.Is(err, ErrInvalid) || !errors.Is(err, unix.EINVAL) {
			t.Errorf("load with %s: %v, want ErrInvalid", what, err)
		}
		if !errors.As(err, &op) || op.Op != "load" || op.Device != name {
			t.Errorf("load with %s: %#v", what, err)
		}
		// The model catches the same mistakes before the kernel does
		// (except the ones only the crypto API knows).
		if what != "bad key size" && tbl.Validate() == nil {
			t.Errorf("model accepts the table with %s", what)
		}
		if _, err := dmsetupErr("load", name, "--table", text); err == nil {
			t.Errorf("dmsetup loaded the table with %s", what)
		}
	}
	// Tables the kernel cannot build for other reasons.
	cannot := map[string]struct {
		text  string
		want  error
		errno unix.Errno
	}{
		// The crypto API has no such algorithm.
		"unknown cipher": {fmt.Sprintf("0 2048 crypt nosuchcipher-xts-plain64 %s 0 %s 0", strings.Repeat("00", 64), a), ErrUnsupported, unix.ENOENT},
		// (7:x would not do: the loop driver creates loop devices on first open.)
		"missing device number": {"0 2048 linear 240:7 0", ErrMissingDevice, unix.ENXIO},
		"missing device path":   {"0 2048 linear /dev/dmt-no-such-disk 0", ErrMissingDevice, unix.ENODEV},
	}
	// A device-mapper device with no table yet has no block device: what
	// a process killed inside a create leaves behind.
	notable, err := c.Create("dmt-errors-notable", "")
	if err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, "dmt-errors-notable")
	cannot["a dm device with no table"] = struct {
		text  string
		want  error
		errno unix.Errno
	}{fmt.Sprintf("0 2048 linear %s 0", notable.Dev), ErrMissingDevice, unix.ENXIO}
	for what, tc := range cannot {
		_, err := c.Load(name, mustTable(t, tc.text))
		t.Logf("load with %s: %v", what, err)
		if !errors.Is(err, tc.want) || !errors.Is(err, tc.errno) || (tc.want == ErrMissingDevice && !errors.Is(err, ErrNotFound)) {
			t.Errorf("load with %s: %v, want %v (%v)", what, err, tc.want, tc.errno)
		}
	}
	if in, _ := c.Info(name); in.InactivePresent {
		t.Error("a refused table left an inactive table")
	}

	// UUIDs: set once, not twice; rename onto an existing name.
	if err := c.SetUUID(name, "DMT-UUID-1"); err != nil {
		t.Fatalf("SetUUID: %v", err)
	}
	if out := strings.TrimSpace(dmsetup(t, "info", "-c", "--noheadings", "-o", "uuid", name)); out != "DMT-UUID-1" {
		t.Errorf("dmsetup sees uuid %q", out)
	}
	if err := c.SetUUID(name, "DMT-UUID-2"); !errors.Is(err, ErrInvalid) {
		t.Errorf("second SetUUID: %v", err)
	}
	other := "dmt-errors-other"
	if _, err := c.CreateWithTable(other, "DMT-UUID-OTHER", lin); err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, other)
	if err := c.Rename(name, other); !errors.Is(err, ErrExists) || !errors.Is(err, unix.EBUSY) {
		t.Errorf("rename onto an existing name: %v", err)
	}
	if _, err := c.Create("dmt-errors-3", "DMT-UUID-OTHER"); !errors.Is(err, ErrExists) {
		t.Errorf("create with a taken uuid: %v", err)
	}
	if _, err := c.Create(strings.Repeat("x", 128), ""); !errors.Is(err, ErrInvalid) {
		t.Errorf("create with a 128-byte name: %v", err)
	}
	if _, err := c.Create("bad/name", ""); !errors.Is(err, ErrInvalid) {
		t.Errorf("create with a slash: %v", err)
	}
}

func TestGuestSuspendLoadResume(t *testing.T) {
	c, a, b := guestSetup(t)
	name := "dmt-suspend"
	t1 := mustTable(t, fmt.Sprintf("0 4096 linear %s 0", a))
	t2 := mustTable(t, fmt.Sprintf("0 4096 linear %s 0\n4096 4096 linear %s 0", b, a))
	if _, err := c.CreateWithTable(name, "", t1); err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, name)
	attr := func() string { return strings.TrimSpace(dmsetup(t, "info", "-c", "--noheadings", "-o", "attr", name)) }

	for _, fl := range []SuspendFlags{0, NoFlush, SkipLockfs, NoFlush | SkipLockfs} {
		in, err := c.Suspend(name, fl)
		if err != nil || !in.Suspended {
			t.Fatalf("Suspend(%v): %+v %v", fl, in, err)
		}
		if got := attr(); got != "L-sw" {
			t.Errorf("dmsetup attr while suspended: %q", got)
		}
		// Suspending twice is fine.
		if _, err := c.Suspend(name, fl); err != nil {
			t.Fatalf("second Suspend: %v", err)
		}
		in, err = c.Resume(name)
		if err != nil || in.Suspended {
			t.Fatalf("Resume: %+v %v", in, err)
		}
		if got := attr(); got != "L--w" {
			t.Errorf("dmsetup attr after resume: %q", got)
		}
	}

	// Load into the inactive slot, read it, clear it; load again and swap.
	in, err := c.Load(name, t2)
	if err != nil || !in.InactivePresent || !in.LivePresent {
		t.Fatalf("Load: %+v %v", in, err)
	}
	if got := attr(); got != "LI-w" {
		t.Errorf("dmsetup attr with an inactive table: %q", got)
	}
	if it, err := c.InactiveTable(name); err != nil || !it.Equal(t2) {
		t.Fatalf("InactiveTable: %v %v", it, err)
	}
	if ref := strings.Join(dmsetupLines(dmsetup(t, "table", "--inactive", name)), "\n"); ref != t2.Payload() {
		t.Errorf("dmsetup table --inactive: %q", ref)
	}
	if in, err := c.ClearInactive(name); err != nil || in.InactivePresent {
		t.Fatalf("ClearInactive: %+v %v", in, err)
	}
	if it, err := c.InactiveTable(name); err != nil || it != nil {
		t.Fatalf("InactiveTable after clear: %v %v", it, err)
	}
	if _, err := c.Load(name, t2); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Suspend(name, 0); err != nil {
		t.Fatal(err)
	}
	in, err = c.Resume(name)
	if err != nil || in.InactivePresent || in.TargetCount != 2 {
		t.Fatalf("Resume with a new table: %+v %v", in, err)
	}
	if live, _ := c.Table(name); !live.Equal(t2) {
		t.Fatalf("live table %q", live.Payload())
	}
	f, err := os.Open(c.NodePath(name))
	if err != nil {
		t.Fatal(err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	f.Close()
	if err != nil || uint64(size) != t2.Size().Bytes() {
		t.Fatalf("device size %d, table size %d (%v)", size, t2.Size().Bytes(), err)
	}

	// A read-only table (LoadReadOnly): the device turns read-only when
	// it goes live (attr "r", Info.ReadOnly, the disk's flag), and a
	// read-write one makes it writable again.
	for _, readOnly := range []bool{true, false} {
		load := c.Load
		if readOnly {
			load = c.LoadReadOnly
		}
		if _, err := load(name, t1); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Suspend(name, 0); err != nil {
			t.Fatal(err)
		}
		in, err := c.Resume(name)
		if err != nil || in.ReadOnly != readOnly {
			t.Fatalf("Resume of a table loaded read-only %v: %+v %v", readOnly, in, err)
		}
		want := "L--w"
		if readOnly {
			want = "L--r"
		}
		if got := attr(); got != want {
			t.Errorf("dmsetup attr after a table loaded read-only %v: %q, want %q", readOnly, got, want)
		}
		out, err := exec.Command("blockdev", "--getro", c.NodePath(name)).CombinedOutput()
		if ro := strings.TrimSpace(string(out)); err != nil || ro != map[bool]string{true: "1", false: "0"}[readOnly] {
			t.Errorf("blockdev --getro after a table loaded read-only %v: %q %v", readOnly, ro, err)
		}
	}

	// Messages: device-mapper statistics through the message interface,
	// against dmsetup's.
	id, err := c.Message(name, 0, "@stats_create - /1")
	if err != nil || id != "0" {
		t.Fatalf("@stats_create: %q %v", id, err)
	}
	ours, err := c.Message(name, 0, "@stats_list")
	if err != nil {
		t.Fatal(err)
	}
	ref := strings.TrimSpace(dmsetup(t, "message", name, "0", "@stats_list"))
	if strings.TrimSpace(ours) != ref || ref == "" {
		t.Errorf("@stats_list: ours %q, dmsetup %q", ours, ref)
	}
	if _, err := c.Message(name, 0, "@stats_delete 0"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Message(name, 0, "no_such_message"); !errors.Is(err, ErrInvalid) {
		t.Errorf("unknown message: %v", err)
	}
}

func TestGuestNodesWithoutUdev(t *testing.T) {
	c, a, _ := guestSetup(t)
	if UdevRunning() {
		t.Fatal("udev looks like it runs in the guest")
	}
	name := "dmt-node"
	in, err := c.Create(name, "")
	if err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, name)
	checkNode(t, c, name, in.Dev)
	if _, err := c.Load(name, mustTable(t, fmt.Sprintf("0 2048 linear %s 0", a))); err != nil {
		t.Fatal(err)
	}
	// A stale node (wrong number) is replaced on resume.
	os.Remove(c.NodePath(name))
	if err := unix.Mknod(c.NodePath(name), unix.S_IFBLK|0o600, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Resume(name); err != nil {
		t.Fatal(err)
	}
	checkNode(t, c, name, in.Dev)
	// Rename moves the node; dmsetup agrees on the name.
	if err := c.Rename(name, name+"-new"); err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, name+"-new")
	checkNoNode(t, c, name)
	checkNode(t, c, name+"-new", in.Dev)
	if out := strings.TrimSpace(dmsetup(t, "info", "-c", "--noheadings", "-o", "name", "-j", strconv.Itoa(int(in.Dev.Major)), "-m", strconv.Itoa(int(in.Dev.Minor)))); out != name+"-new" {
		t.Errorf("dmsetup sees name %q", out)
	}
	// The node works: write through it, read the disk.
	data := randomKey(t, 4096)
	f, err := os.OpenFile(c.NodePath(name+"-new"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 8192); err != nil {
		t.Fatal(err)
	}
	f.Sync()
	f.Close()
	if got := readDirect(t, testvm.GuestDisks()[0], 16, 8); !bytes.Equal(got, data) {
		t.Error("data written through the node is not on the disk")
	}
	if err := c.Remove(name + "-new"); err != nil {
		t.Fatal(err)
	}
	checkNoNode(t, c, name+"-new")
	// dmsetup's nodes are ours too: dmsetup removes what we made.
	in, err = c.CreateWithTable(name, "", mustTable(t, fmt.Sprintf("0 2048 linear %s 0", a)))
	if err != nil {
		t.Fatal(err)
	}
	dmsetup(t, "remove", name)
	checkNoNode(t, c, name)
}

// TestGuestSuspendMirrorUnderSignals: a mirror with writes in flight and
// its region recovery running is suspended and resumed again and again
// while its suspending thread is showered with SIGURG (what the Go
// runtime sends to preempt goroutines). The kernel waits for in-flight
// I/O interruptibly; a signal there used to end the suspend with EINTR
// after dm-raid1's presuspend had taken every recovery slot, which it
// never gives back (no presuspend_undo), and the client's retry then
// blocked for ever in dm_rh_stop_recovery with no I/O in flight: the
// rare hang of earlier test runs. Suspend now blocks signals on its
// thread; every suspend must return within a minute.
func TestGuestSuspendMirrorUnderSignals(t *testing.T) {
	c, a, b := guestSetup(t)
	const n = 32768 // 16 MiB
	name := "dmt-mirror-signals"
	tbl := Table{{Start: 0, Length: n, Params: &Mirror{
		Log:  MirrorLog{Type: "core", RegionSize: 64},
		Legs: []MirrorLeg{{Dev: a.Ref(), Offset: 0}, {Dev: b.Ref(), Offset: 0}},
	}}}
	if _, err := c.CreateWithTable(name, "", tbl); err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, name)
	// Writers keep I/O in flight.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var writes atomic.Int64
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			f, err := os.OpenFile("/dev/mapper/"+name, os.O_WRONLY|unix.O_DIRECT, 0)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			buf := alignedBuf(t, 64<<10)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64((i*7+w*13)%(n/128)) * 64 << 10
				if _, err := f.WriteAt(buf, off); err != nil {
					t.Error(err)
					return
				}
				writes.Add(1)
			}
		}(w)
	}
	defer func() { close(stop); wg.Wait() }()

	deadline := time.Now().Add(15 * time.Second)
	rounds, signals := 0, 0
	for time.Now().Before(deadline) {
		done := make(chan error, 1)
		tidc := make(chan int, 1)
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			tidc <- unix.Gettid()
			_, err := c.Suspend(name, 0)
			done <- err
		}()
		tid := <-tidc
		var err error
		timeout := time.After(time.Minute)
	wait:
		for {
			select {
			case err = <-done:
				break wait
			case <-timeout:
				fmt.Printf("dmtable: suspend of %s hung in round %d\n", name, rounds)
				t.Fatalf("round %d: the suspend of %s has not returned after a minute (%d signals sent)", rounds, name, signals)
			default:
				if unix.Tgkill(unix.Getpid(), tid, unix.SIGURG) == nil {
					signals++
				}
				time.Sleep(50 * time.Microsecond)
			}
		}
		if err != nil {
			t.Fatalf("round %d: suspend: %v", rounds, err)
		}
		if _, err := c.Resume(name); err != nil {
			t.Fatalf("round %d: resume: %v", rounds, err)
		}
		rounds++
	}
	t.Logf("%d suspend/resume rounds with %d SIGURGs sent to the suspending thread, %d writes", rounds, signals, writes.Load())
	if rounds < 10 || writes.Load() == 0 {
		t.Fatalf("too little exercised: %d rounds, %d writes", rounds, writes.Load())
	}
}
