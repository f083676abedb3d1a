package lvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/testvm"
	"golang.org/x/sys/unix"
)

// Host side: the TestGuest* tests of this package, rerun inside the VM
// with four 256 MiB virtio disks (/dev/vda../dev/vdd). Each guest test
// starts from blank disks (see freshDisks) and builds the VG it needs.
func TestVM(t *testing.T) {
	testvm.RequireVM(t)
	opts := testvm.Options{
		Disks: []testvm.Disk{{Size: 256 << 20}, {Size: 256 << 20}, {Size: 256 << 20}, {Size: 256 << 20}},
		Env:   map[string]string{},
	}
	// DMCONVERT_LVM_FIXTURES=<dir relative to the share> records the lvm
	// outputs the guest tests see (keep the work directory with
	// DMCONVERT_VM_KEEP=1 to collect them); used to refresh testdata/.
	if d := os.Getenv(envFixtures); d != "" {
		opts.Env[envFixtures] = d
	}
	testvm.RunTestsInGuest(t, opts)
}

const envFixtures = "DMCONVERT_LVM_FIXTURES"

// The guest has no thin_check (thin-provisioning-tools); lvm would refuse
// to activate a thin pool without it.
const guestConfig = `global { thin_check_executable="" }`

// guestClient is the Client guest tests use: the guest config, and the
// fixture recorder when asked for.
func guestClient(t *testing.T) *Client {
	c := &Client{Config: guestConfig}
	record(t, c)
	return c
}

// recorder writes what a Client sees (lvm's argv and outputs, device
// numbers, label sectors) as numbered files in the directory of the
// current scene; replay_test.go plays such a directory back. Scenes are
// named by the guest tests (scene(c, "discover-mixed")).
type recorder struct {
	root  string
	scene string
	seq   int
}

var recorders = map[*Client]*recorder{}

func record(t *testing.T, c *Client) {
	root := os.Getenv(envFixtures)
	if root == "" {
		return
	}
	if !filepath.IsAbs(root) {
		root = filepath.Join(testvm.GuestFile(""), root)
	}
	r := &recorder{root: root, scene: t.Name()}
	recorders[c] = r
	c.Trace = func(args []string, stdout, stderr []byte, code int) {
		base := r.next("lvm")
		os.WriteFile(base+".args", []byte(strings.Join(args, "\n")+"\n"), 0o644)
		os.WriteFile(base+".stdout", stdout, 0o644)
		os.WriteFile(base+".stderr", stderr, 0o644)
		os.WriteFile(base+".rc", []byte(strconv.Itoa(code)+"\n"), 0o644)
	}
	c.statDev = func(path string) (dmtable.Dev, error) {
		d, err := blockDevice(path)
		res := d.String()
		if err != nil {
			res = "error " + err.Error()
		}
		os.WriteFile(r.next("stat")+".txt", []byte(path+"\n"+res+"\n"), 0o644)
		return d, err
	}
	c.readLabel = func(path string) (*Label, error) {
		base := r.next("label")
		os.WriteFile(base+".path", []byte(path+"\n"), 0o644)
		f, err := os.Open(path)
		if err != nil {
			os.WriteFile(base+".err", []byte(err.Error()+"\n"), 0o644)
			return ReadLabel(path)
		}
		defer f.Close()
		buf := make([]byte, labelScanSectors*dmtable.SectorSize)
		if _, err := io.ReadFull(f, buf); err != nil {
			os.WriteFile(base+".err", []byte(err.Error()+"\n"), 0o644)
		} else {
			os.WriteFile(base+".bin", buf, 0o644)
		}
		return ReadLabel(path)
	}
}

// scene starts a new fixture directory for c's next calls.
func scene(c *Client, name string) {
	if r := recorders[c]; r != nil {
		r.scene, r.seq = name, 0
	}
}

// saveFixture stores extra data (a devices file) in c's current scene.
func saveFixture(c *Client, name string, data []byte) {
	if r := recorders[c]; r != nil {
		dir := filepath.Join(r.root, r.scene)
		os.MkdirAll(dir, 0o755)
		os.WriteFile(filepath.Join(dir, name), data, 0o644)
	}
}

func (r *recorder) next(kind string) string {
	dir := filepath.Join(r.root, r.scene)
	os.MkdirAll(dir, 0o755)
	r.seq++
	return filepath.Join(dir, fmt.Sprintf("%03d-%s", r.seq, kind))
}

// sh runs a tool in the guest and fails the test if it fails.
func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := shErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return out
}

func shErr(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "LVM_SUPPRESS_FD_WARNINGS=1")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%w: %s", err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// lvmSh runs an lvm command with the guest config.
func lvmSh(t *testing.T, cmd string, args ...string) string {
	t.Helper()
	return sh(t, "lvm", append([]string{cmd, "--config", guestConfig}, args...)...)
}

// lvmRows runs an lvm report command with JSON output and returns the
// rows of one sub-report.
func lvmRows(t *testing.T, kind, cmd string, args ...string) []map[string]string {
	t.Helper()
	a := append(append([]string{}, reportFlags...), args...)
	rep, err := parseReport([]byte(lvmSh(t, cmd, a...)))
	if err != nil {
		t.Fatal(err)
	}
	return rep.rows(kind)
}

func disks(t *testing.T, n int) []string {
	t.Helper()
	d := testvm.GuestDisks()
	if len(d) < n {
		t.Fatalf("need %d guest disks, have %v", n, d)
	}
	return d[:n]
}

// freshDisks removes every dm device and blanks the start and end of
// the given disks, so a test never sees the previous test's PVs. It
// registers the same cleanup for the end of the test.
func freshDisks(t *testing.T, ds ...string) {
	t.Helper()
	wipe := func() {
		exec.Command("dmsetup", "remove_all", "--force").Run()
		for _, d := range ds {
			sz := sh(t, "blockdev", "--getsz", d)
			n, err := strconv.ParseUint(strings.TrimSpace(sz), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			sh(t, "dd", "if=/dev/zero", "of="+d, "bs=1M", "count=2", "oflag=direct", "status=none")
			sh(t, "dd", "if=/dev/zero", "of="+d, "bs=512", "seek="+strconv.FormatUint(n-4096, 10), "count=4096", "oflag=direct", "status=none")
		}
		os.RemoveAll("/etc/lvm/devices")
	}
	wipe()
	t.Cleanup(wipe)
}

func devOf(t *testing.T, path string) dmtable.Dev {
	t.Helper()
	d, err := blockDevice(path)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func sectorsOf(t *testing.T, dev string) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(strings.TrimSpace(sh(t, "blockdev", "--getsz", dev)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestGuestDiscover builds a VG with one of each kind of LV the engine
// must handle and compares Discover with what pvs, lvs and dmsetup say.
func TestGuestDiscover(t *testing.T) {
	testvm.RequireGuest(t)
	ctx := context.Background()
	d := disks(t, 4)
	a, b, orphan := d[0], d[1], d[3]
	freshDisks(t, d...)
	// lvm probes for the thin-pool and raid targets with /sbin/modprobe,
	// which the guest may lack; load them first.
	for _, m := range []string{"dm-thin-pool", "dm-raid", "raid1"} {
		if _, err := shErr("modprobe", m); err != nil {
			t.Logf("modprobe %s: %v", m, err)
		}
	}
	lvmSh(t, "pvcreate", "-q", a, b)
	lvmSh(t, "vgcreate", "-q", "-s", "4m", "dvg", a, b)
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "lin", "-L", "40m", "dvg", a)
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "striped", "-i", "2", "-I", "64k", "-L", "32m", "dvg", a, b)
	lvmSh(t, "lvcreate", "-q", "-y", "--type", "thin-pool", "-n", "pool", "-L", "32m", "dvg", a)
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "thin1", "-V", "64m", "--thinpool", "dvg/pool")
	lvmSh(t, "lvcreate", "-q", "-y", "-s", "-n", "snap", "-L", "12m", "dvg/lin", a)
	lvmSh(t, "lvcreate", "-q", "-y", "--type", "raid1", "-m", "1", "-n", "r1", "-L", "16m", "dvg", a, b)
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "inact", "-L", "8m", "-an", "-Zn", "dvg", a)
	t.Cleanup(func() { exec.Command("lvm", "vgremove", "--config", guestConfig, "-ff", "-y", "dvg").Run() })

	c := guestClient(t)
	scene(c, "discover-mixed-a")
	p, err := c.Discover(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	var desc strings.Builder
	p.Describe(&desc)
	t.Logf("Describe:\n%s", desc.String())

	// The PV, against pvs.
	pr := lvmRows(t, "pv", "pvs", "-o", "pv_uuid,pv_name,pe_start,pv_pe_count,pv_pe_alloc_count,dev_size,pv_mda_count,pv_mda_size,vg_name,vg_uuid,vg_extent_size", a)
	if len(pr) != 1 {
		t.Fatalf("pvs %s: %v", a, pr)
	}
	want := pr[0]
	got := map[string]string{
		"pv_uuid": p.UUID, "pv_name": p.Name, "pe_start": p.PEStart.String(), "pv_pe_count": fmt.Sprint(p.PECount),
		"pv_pe_alloc_count": fmt.Sprint(p.PEAllocCount), "dev_size": p.DevSize.String(),
		"pv_mda_count": fmt.Sprint(p.MDACount), "pv_mda_size": p.MDASize.String(), "vg_name": p.VG.Name,
		"vg_uuid": p.VG.UUID, "vg_extent_size": p.ExtentSize.String(),
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("PV field %s: Discover %q, pvs %q", k, got[k], v)
		}
	}
	if p.Dev != devOf(t, a) {
		t.Errorf("Dev %v, want %v", p.Dev, devOf(t, a))
	}
	if uint64(p.DevSize) != sectorsOf(t, a) {
		t.Errorf("DevSize %d, blockdev says %d", p.DevSize, sectorsOf(t, a))
	}
	// The label's metadata areas: as many as lvm counts, the smallest of
	// lvm's size.
	if len(p.Label.MetadataAreas) != p.MDACount || p.Label.MetadataAreas[0].Size != p.MDASize {
		t.Errorf("label metadata areas %+v, lvm: %d of %d sectors", p.Label.MetadataAreas, p.MDACount, p.MDASize)
	}
	if len(p.Label.DataAreas) != 1 || p.Label.DataAreas[0].Start != p.PEStart {
		t.Errorf("label data areas %+v, pe_start %d", p.Label.DataAreas, p.PEStart)
	}

	// The extent map, against pvs --segments.
	var wantSegs []PVSegment
	for _, r := range lvmRows(t, "pvseg", "pvs", "--segments", "-o", "pvseg_start,pvseg_size,lv_uuid,lv_name", a) {
		s := PVSegment{LVUUID: r["lv_uuid"], LV: unbracket(r["lv_name"])}
		s.Start, _ = strconv.ParseUint(r["pvseg_start"], 10, 64)
		s.Size, _ = strconv.ParseUint(r["pvseg_size"], 10, 64)
		wantSegs = append(wantSegs, s)
	}
	sortSegments(wantSegs)
	if !slices.Equal(p.Segments, wantSegs) {
		t.Errorf("segments:\n Discover %+v\n pvs      %+v", p.Segments, wantSegs)
	}
	last, _ := p.LastAllocated()
	if p.UsedEnd() != p.PEStart+dmtable.Sectors(last.End())*p.ExtentSize {
		t.Errorf("UsedEnd %d, last segment %+v", p.UsedEnd(), last)
	}

	// Every LV of the VG, hidden ones included, against lvs -a.
	lvRows := lvmRows(t, "lv", "lvs", "-a", "-o", "lv_uuid,lv_name,lv_attr,lv_role,lv_kernel_major,lv_kernel_minor,lv_dm_path", "dvg")
	if len(lvRows) != len(p.VG.LVs) {
		t.Errorf("Discover has %d LVs, lvs -a %d", len(p.VG.LVs), len(lvRows))
	}
	for _, r := range lvRows {
		lv := p.VG.LVByUUID(r["lv_uuid"])
		if lv == nil {
			t.Errorf("LV %s (%s) missing from Discover", r["lv_name"], r["lv_uuid"])
			continue
		}
		if lv.Name != unbracket(r["lv_name"]) || lv.Hidden != strings.HasPrefix(r["lv_name"], "[") ||
			lv.Attr != r["lv_attr"] || strings.Join(lv.Roles, ",") != r["lv_role"] || lv.DMPath != r["lv_dm_path"] {
			t.Errorf("LV %s: Discover %+v, lvs %v", r["lv_name"], lv, r)
		}
		active := r["lv_kernel_major"] != "-1"
		if lv.Active != active || (active && lv.Kernel.String() != r["lv_kernel_major"]+":"+r["lv_kernel_minor"]) {
			t.Errorf("LV %s: active %v %v, lvs %s:%s", lv.Name, lv.Active, lv.Kernel, r["lv_kernel_major"], r["lv_kernel_minor"])
		}
	}
	// Active LVs against the kernel: dmsetup's name and number.
	dm := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(sh(t, "dmsetup", "info", "-c", "--noheadings", "--separator", " ", "-o", "name,major,minor")), "\n") {
		if f := strings.Fields(l); len(f) == 3 {
			dm[f[0]] = f[1] + ":" + f[2]
		}
	}
	for _, lv := range p.VG.LVs {
		name := lv.DMName()
		if slices.Equal(lv.Layout, []string{"thin", "pool"}) {
			// lvm reports a thin pool's "-tpool" layer as its kernel
			// device; the device at lv_dm_path is a linear over it.
			name += "-tpool"
		}
		if lv.Active && dm[name] != lv.Kernel.String() {
			t.Errorf("LV %s: Discover says %s is %v, dmsetup %q", lv.Name, name, lv.Kernel, dm[name])
		}
		if !lv.Active && dm[lv.DMName()] != "" {
			t.Errorf("LV %s: Discover says inactive, dmsetup has %s", lv.Name, lv.DMName())
		}
	}
	// The LVs on this PV, and on the other one.
	names := func(lvs []*LV) []string {
		var n []string
		for _, lv := range lvs {
			n = append(n, lv.Name)
		}
		sort.Strings(n)
		return n
	}
	if got, want := names(p.LVs()), []string{"inact", "lin", "lvol0_pmspare", "pool_tdata", "pool_tmeta", "r1_rimage_0", "r1_rmeta_0", "snap", "striped"}; !slices.Equal(got, want) {
		t.Errorf("LVs on %s: %v, want %v", a, got, want)
	}
	scene(c, "discover-mixed-b")
	pb, err := c.Discover(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := names(pb.LVs()), []string{"r1_rimage_1", "r1_rmeta_1", "striped"}; !slices.Equal(got, want) {
		t.Errorf("LVs on %s: %v, want %v", b, got, want)
	}
	// Roles and relations the engine reads.
	vg := p.VG
	checks := []struct {
		lv   string
		ok   bool
		what string
	}{
		{"pool_tdata", vg.LV("pool_tdata").HasRole("data") && vg.LV("pool_tdata").Parent == "pool" && vg.LV("pool_tdata").Hidden, "thin pool data"},
		{"pool_tmeta", vg.LV("pool_tmeta").HasRole("metadata") && !vg.LV("pool_tmeta").Public(), "thin pool metadata"},
		{"pool", vg.LV("pool").DataLV == "pool_tdata" && vg.LV("pool").MetadataLV == "pool_tmeta", "pool sub-LVs"},
		{"thin1", vg.LV("thin1").Pool == "pool" && vg.LV("thin1").Public(), "thin LV"},
		{"snap", vg.LV("snap").Origin == "lin" && vg.LV("snap").HasRole("snapshot"), "snapshot"},
		{"r1_rimage_0", vg.LV("r1_rimage_0").HasRole("image") && vg.LV("r1_rimage_0").Parent == "r1", "raid image"},
		{"inact", !vg.LV("inact").Active, "inactive LV"},
		{"lin", vg.LV("lin").Active && vg.LV("lin").HasRole("origin"), "active origin"},
	}
	for _, ck := range checks {
		if !ck.ok {
			t.Errorf("%s: %s: %+v", ck.lv, ck.what, vg.LV(ck.lv))
		}
	}
	// Segment device lists, against lvs --segments seg_le_ranges
	// ("/dev/vda:10-13,/dev/vdb:0-3" / "[r1_rimage_0]:0-3,...").
	for _, r := range lvmRows(t, "seg", "lvs", "-a", "--segments", "-o", "lv_uuid,seg_start_pe,seg_le_ranges", "dvg") {
		lv := vg.LVByUUID(r["lv_uuid"])
		var seg *LVSegment
		for i := range lv.Segments {
			if fmt.Sprint(lv.Segments[i].StartExtent) == r["seg_start_pe"] {
				seg = &lv.Segments[i]
			}
		}
		if seg == nil {
			t.Errorf("LV %s: no segment at %s", lv.Name, r["seg_start_pe"])
			continue
		}
		var ranges []string
		for _, ar := range seg.Devices {
			name := ar.PV
			if ar.LV != "" {
				name = ar.LV
				if l := vg.LV(ar.LV); l != nil && l.Hidden {
					name = "[" + name + "]"
				}
			}
			ranges = append(ranges, fmt.Sprintf("%s:%d", name, ar.Start))
		}
		var wantRanges []string
		for _, x := range splitList(r["seg_le_ranges"]) {
			i := strings.LastIndexByte(x, ':')
			wantRanges = append(wantRanges, x[:i]+":"+strings.Split(x[i+1:], "-")[0])
		}
		if !slices.Equal(ranges, wantRanges) {
			t.Errorf("LV %s segment %s: devices %v, lvs %v", lv.Name, r["seg_start_pe"], ranges, wantRanges)
		}
	}
	if err := p.Check(); err != nil {
		t.Errorf("Check: %v", err)
	}

	// Not a PV: a blank disk; then an orphan PV; then a PV the filter hides.
	scene(c, "discover-blank")
	if _, err := c.Discover(ctx, orphan); !errors.Is(err, ErrNotPV) {
		t.Errorf("blank disk: %v, want ErrNotPV", err)
	} else if ne := new(NotPVError); !errors.As(err, &ne) || ne.Labelled {
		t.Errorf("blank disk: %#v", err)
	}
	lvmSh(t, "pvcreate", "-q", orphan)
	scene(c, "discover-orphan")
	if _, err := c.Discover(ctx, orphan); !errors.Is(err, ErrNoVG) {
		t.Errorf("orphan PV: %v, want ErrNoVG", err)
	}
	hidden := &Client{Config: fmt.Sprintf(`global { thin_check_executable="" } devices { filter=["r|^%s$|","a|.*|"] }`, orphan)}
	record(t, hidden)
	scene(hidden, "discover-filtered")
	_, err = hidden.Discover(ctx, orphan)
	if ne := new(NotPVError); !errors.As(err, &ne) || !ne.Labelled || !errors.Is(err, ErrNotPV) {
		t.Errorf("filtered PV: %v, want a NotPVError with Labelled", err)
	} else {
		t.Logf("filtered PV: %v", err)
	}
	scene(c, "discover-devnull")
	if _, err := c.Discover(ctx, "/dev/null"); err == nil {
		t.Error("Discover(/dev/null) succeeded")
	}

	// Duplicates: a dm linear copy of the whole of b carries the same
	// label. lvm keeps using b; Discover of the copy says so; restricted
	// to the copy (--devices), lvm uses the copy.
	n := sectorsOf(t, b)
	sh(t, "dmsetup", "create", "dcopy", "--table", fmt.Sprintf("0 %d linear %s 0", n, b))
	defer exec.Command("dmsetup", "remove", "dcopy").Run()
	scene(c, "discover-duplicate")
	_, err = c.Discover(ctx, "/dev/mapper/dcopy")
	var de *DuplicateError
	if !errors.As(err, &de) || !errors.Is(err, ErrDuplicatePV) || de.Chosen != b || de.UUID != pb.UUID {
		t.Errorf("Discover of a duplicate: %v, want a DuplicateError choosing %s", err, b)
	} else {
		t.Logf("duplicate: %v", err)
	}
	rc := *c
	rc.Devices = []string{"/dev/mapper/dcopy", a}
	scene(c, "discover-restricted")
	pc, err := rc.Discover(ctx, "/dev/mapper/dcopy")
	if err != nil {
		t.Fatalf("Discover restricted to the copy: %v", err)
	}
	if pc.UUID != pb.UUID || pc.Name != "/dev/mapper/dcopy" || pc.Dev != devOf(t, "/dev/mapper/dcopy") {
		t.Errorf("restricted Discover: %s %s %v", pc.UUID, pc.Name, pc.Dev)
	}
	if err := pc.Check(); err != nil {
		t.Errorf("Check of the VG seen through the copy: %v", err)
	}

	// Restricted to a alone, the VG is partial: Discover works, Check
	// refuses.
	rc.Devices = []string{a}
	scene(c, "discover-partial")
	pp, err := rc.Discover(ctx, a)
	if err != nil {
		t.Fatalf("Discover of a partial VG: %v", err)
	}
	if err := pp.Check(); !errors.Is(err, ErrUnsupportedVG) || !pp.VG.Partial || pp.VG.MissingPVCount != 1 {
		t.Errorf("partial VG: Check %v, partial %v, missing %d", err, pp.VG.Partial, pp.VG.MissingPVCount)
	} else {
		t.Logf("partial VG: %v", err)
	}
	if mb := pp.VG.PV(pb.UUID); mb == nil || !mb.Missing || !mb.Dev.IsZero() {
		t.Errorf("missing PV entry: %+v", mb)
	}
}

// TestGuestFence: while the fence is held, lvm commands that reload the
// VG's LVs wait (or fail at once with wait_for_locks=0), our own fenced
// calls work, and everything runs again after Release.
func TestGuestFence(t *testing.T) {
	testvm.RequireGuest(t)
	ctx := context.Background()
	d := disks(t, 3)[2]
	freshDisks(t, d)
	lvmSh(t, "pvcreate", "-q", d)
	lvmSh(t, "vgcreate", "-q", "fvg", d)
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "lv", "-L", "8m", "fvg")
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "off", "-L", "8m", "-an", "-Zn", "fvg")
	t.Cleanup(func() { exec.Command("lvm", "vgremove", "-ff", "-y", "fvg").Run() })

	c := guestClient(t)
	path, err := c.LockPath(ctx, "fvg")
	if err != nil {
		t.Fatal(err)
	}
	if path != "/run/lock/lvm/V_fvg" {
		t.Errorf("lock path %s", path)
	}
	scene(c, "fence-lock")
	fe, err := c.LockVG(ctx, "fvg", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer fe.Release()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("lock file: %v", err)
	}
	if h := LockHolders(path); len(h) != 1 || h[0].PID != os.Getpid() || !h[0].Write {
		t.Errorf("/proc/locks holders of %s: %+v, want us (pid %d) exclusive", path, h, os.Getpid())
	}

	// With wait_for_locks=0 the reloading commands fail at once, with
	// lvm's "command failed" exit code.
	nowait := &Client{Config: `global { wait_for_locks=0 }`}
	for _, cmd := range [][]string{
		{"lvchange", "--refresh", "fvg/lv"},
		{"vgchange", "--refresh", "fvg"}, // reloads under a shared lock: needs the exclusive fence
		{"lvchange", "-ay", "fvg/off"},
		{"vgchange", "-an", "fvg"},
		{"lvextend", "-L", "+4m", "fvg/lv"},
		{"lvs", "fvg"},
		// VG namespace changes take P_global and V_<vg>: the fence
		// stops them without holding P_global.
		{"vgrename", "fvg", "fvg2"},
		{"vgremove", "-f", "fvg"},
	} {
		start := time.Now()
		_, err := nowait.Run(ctx, cmd[0], cmd[1:]...)
		var ce *CommandError
		if !errors.As(err, &ce) || ce.ExitCode != ExitFailed {
			t.Errorf("%v while fenced: %v, want exit %d", cmd, err, ExitFailed)
		} else {
			t.Logf("%v while fenced: exit %d after %v: %s", cmd, ce.ExitCode, time.Since(start).Round(time.Millisecond), ce.Stderr)
		}
	}
	// Commands that read no VG are not stopped.
	if _, err := nowait.Run(ctx, "pvscan", "--cache"); err != nil {
		t.Errorf("pvscan --cache while fenced: %v", err)
	}
	// A second fence times out, names us, and matches the sentinels.
	_, err = c.LockVG(ctx, "fvg", 300*time.Millisecond)
	var le *LockError
	if !errors.Is(err, ErrLockTimeout) || !errors.Is(err, unix.EWOULDBLOCK) || !errors.As(err, &le) ||
		len(le.Holders) == 0 || le.Holders[0].PID != os.Getpid() {
		t.Errorf("second LockVG: %v", err)
	} else {
		t.Logf("second LockVG: %v", err)
	}
	// Our fenced calls work, with the kernel state.
	scene(c, "fence-discover")
	p, err := fe.Discover(ctx, d)
	if err != nil {
		t.Fatalf("Fence.Discover: %v", err)
	}
	if lv := p.VG.LV("lv"); lv == nil || !lv.Active {
		t.Errorf("Fence.Discover: lv %+v", lv)
	}
	if err := fe.ActivateLVs(ctx, []string{"off"}, nil); err != nil {
		t.Errorf("Fence.ActivateLVs: %v", err)
	}
	if _, err := os.Stat("/dev/mapper/fvg-off"); err != nil {
		t.Errorf("after Fence.ActivateLVs: %v", err)
	}

	// A blocking lvchange --refresh waits for the fence...
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := c.Run(ctx, "lvchange", "--refresh", "fvg/lv")
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("lvchange --refresh finished while fenced (after %v): %v", time.Since(start), err)
	case <-time.After(2 * time.Second):
	}
	// ...until Release.
	if err := fe.Release(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("lvchange --refresh after Release: %v", err)
		}
		t.Logf("lvchange --refresh waited %v and ran after Release", time.Since(start).Round(time.Millisecond))
	case <-time.After(60 * time.Second):
		t.Fatal("lvchange --refresh still waiting 60 s after Release")
	}
	if err := fe.Release(); err != nil {
		t.Errorf("second Release: %v", err)
	}
	if _, err := fe.Discover(ctx, d); !errors.Is(err, ErrFenceReleased) {
		t.Errorf("Fence.Discover after Release: %v", err)
	}
	if _, err := nowait.Run(ctx, "lvs", "fvg"); err != nil {
		t.Errorf("lvs after Release: %v", err)
	}

	// A VG that does not exist: refused, nothing left behind.
	scene(c, "fence-novg")
	if _, err := c.LockVG(ctx, "novg", time.Second); !errors.Is(err, ErrNoSuchVG) {
		t.Errorf("LockVG(novg): %v", err)
	}
	if _, err := os.Stat("/run/lock/lvm/V_novg"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file of novg left behind: %v", err)
	}
	if _, err := c.LockVG(ctx, "../etc", time.Second); err == nil {
		t.Error("LockVG accepted ../etc")
	}
}

// TestGuestShrinkPV: pvresize through ShrinkPV, refused with the LV
// named when the tail is allocated, and on a PV with a metadata area at
// its end.
func TestGuestShrinkPV(t *testing.T) {
	testvm.RequireGuest(t)
	ctx := context.Background()
	d := disks(t, 2)
	a, b := d[0], d[1]
	freshDisks(t, a, b)
	lvmSh(t, "pvcreate", "-q", a)
	lvmSh(t, "pvcreate", "-q", "--pvmetadatacopies", "2", b)
	lvmSh(t, "vgcreate", "-q", "-s", "4m", "svg", a, b)
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "head", "-L", "40m", "svg", a+":0-9")
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "tail", "-L", "8m", "svg", a+":50-51")
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "onb", "-L", "8m", "svg", b+":0-1")
	t.Cleanup(func() { exec.Command("lvm", "vgremove", "-ff", "-y", "svg").Run() })
	c := guestClient(t)

	scene(c, "shrink-refused")
	p, err := c.Discover(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if p.PEStart != 2048 || p.ExtentSize != 8192 || p.PECount != 63 {
		t.Fatalf("unexpected geometry: pe_start %d extent %d count %d", p.PEStart, p.ExtentSize, p.PECount)
	}
	wantMin := dmtable.Sectors(2048 + 52*8192)
	if p.MinSize() != wantMin {
		t.Errorf("MinSize %d, want %d", p.MinSize(), wantMin)
	}
	err = c.ShrinkPV(ctx, a, 300000)
	var se *ShrinkError
	if !errors.As(err, &se) || !errors.Is(err, ErrExtentsInUse) || se.LV != "svg/tail" || se.Minimum != wantMin || se.Extent != 51 {
		t.Fatalf("ShrinkPV over the tail LV: %v", err)
	}
	t.Logf("refused: %v", err)
	if r := lvmRows(t, "pv", "pvs", "-o", "pv_pe_count", a); r[0]["pv_pe_count"] != "63" {
		t.Errorf("refused shrink changed the PV: %v", r)
	}
	// lvm refuses the same on its own, with ECMD_FAILED.
	scene(c, "shrink-lvm-refuses")
	_, err = c.Run(ctx, "pvresize", "-y", "--setphysicalvolumesize", "300000s", a)
	var ce *CommandError
	if !errors.As(err, &ce) || ce.ExitCode != ExitFailed {
		t.Errorf("pvresize over allocated extents: %v", err)
	}

	// Exactly the minimum works.
	scene(c, "shrink-min")
	if err := c.ShrinkPV(ctx, a, wantMin); err != nil {
		t.Fatalf("ShrinkPV to the minimum: %v", err)
	}
	if r := lvmRows(t, "pv", "pvs", "-o", "pv_pe_count", a); r[0]["pv_pe_count"] != "52" {
		t.Errorf("after ShrinkPV: %v", r)
	}
	// Free the tail, fit to a limit, shrink again.
	lvmSh(t, "lvremove", "-q", "-y", "svg/tail")
	scene(c, "shrink-fit")
	p, err = c.Discover(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	fit, err := p.FitSize(300000)
	if err != nil || fit != 2048+36*8192 {
		t.Fatalf("FitSize(300000) = %d, %v", fit, err)
	}
	if err := c.ShrinkPV(ctx, a, fit); err != nil {
		t.Fatal(err)
	}
	p, err = c.Discover(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if p.PECount != 36 || p.End() != fit {
		t.Errorf("after ShrinkPV(%d): %d extents, End %d", fit, p.PECount, p.End())
	}
	if _, err := p.FitSize(2048 + 5*8192); !errors.Is(err, ErrExtentsInUse) {
		t.Errorf("FitSize below the head LV: %v", err)
	}

	// The PV with a second metadata area at its end: pvresize moves it.
	scene(c, "shrink-2mda")
	pb, err := c.Discover(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	tail, ok := pb.TailMetadata()
	if !ok || pb.MDACount != 2 || tail.End() != pb.DevSize {
		t.Fatalf("2-mda PV: tail area %+v %v, %d mdas, device %d", tail, ok, pb.MDACount, pb.DevSize)
	}
	if pb.End() != pb.DevSize {
		t.Errorf("End %d with a metadata area at the device end %d", pb.End(), pb.DevSize)
	}
	if pb.MinSize() != 2048+2*8192+tail.Size {
		t.Errorf("MinSize %d with tail mda %+v", pb.MinSize(), tail)
	}
	fit, err = pb.FitSize(200000)
	if want := dmtable.Sectors(2048 + 23*8192 + tail.Size); err != nil || fit != want {
		t.Fatalf("FitSize(200000) = %d, %v; want %d", fit, err, want)
	}
	if err := c.ShrinkPV(ctx, b, fit); err != nil {
		t.Fatal(err)
	}
	pb, err = c.Discover(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	tail, ok = pb.TailMetadata()
	if pb.PECount != 23 || !ok || tail.End() != fit || pb.End() != fit {
		t.Errorf("after ShrinkPV(%d) of the 2-mda PV: %d extents, tail mda %+v, End %d", fit, pb.PECount, tail, pb.End())
	}
	if err := c.ShrinkPV(ctx, b, 2048+1*8192+tail.Size); !errors.Is(err, ErrExtentsInUse) {
		t.Errorf("ShrinkPV over onb: %v", err)
	}
	if err := c.ShrinkPV(ctx, b, pb.DevSize+1); err == nil {
		t.Error("ShrinkPV beyond the device succeeded")
	}
	// GrowPV gives the space back.
	scene(c, "grow")
	if err := c.GrowPV(ctx, a); err != nil {
		t.Fatal(err)
	}
	if r := lvmRows(t, "pv", "pvs", "-o", "pv_pe_count", a); r[0]["pv_pe_count"] != "63" {
		t.Errorf("after GrowPV: %v", r)
	}
}

// moveWithCopy makes the situation after a conversion: the PV of
// oldDev is copied to newDisk at 1 MiB and exposed as the dm device
// name (a linear map at that offset, with a CRYPT- dm uuid as the
// engine's final device has), and the label on oldDev is wiped.
func moveWithCopy(t *testing.T, oldDev, newDisk, name string, pvSectors uint64) string {
	t.Helper()
	sh(t, "dd", "if="+oldDev, "of="+newDisk, "bs=1M", "seek=1", "count="+strconv.FormatUint(pvSectors/2048, 10), "oflag=direct", "status=none")
	uuid := "CRYPT-LUKS2-00112233445566778899aabbccddeeff-" + name
	sh(t, "dmsetup", "create", name, "--uuid", uuid, "--table", fmt.Sprintf("0 %d linear %s 2048", pvSectors, newDisk))
	sh(t, "dd", "if=/dev/zero", "of="+oldDev, "bs=1M", "count=1", "oflag=direct", "status=none")
	return "/dev/mapper/" + name
}

// TestGuestRefresh: after the PV moved to another device, Refresh
// updates the devices file and lvm reports the PV on the new device.
func TestGuestRefresh(t *testing.T) {
	testvm.RequireGuest(t)
	ctx := context.Background()
	d := disks(t, 4)
	old, other := d[3], d[2]
	freshDisks(t, old, other)
	const pvSize = 131072 // 64 MiB
	withDF := `global { thin_check_executable="" } devices { use_devicesfile=1 }`
	lvmSh(t, "pvcreate", "-q", "--setphysicalvolumesize", fmt.Sprintf("%ds", pvSize), old)
	lvmSh(t, "vgcreate", "-q", "rvg", old)
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "lv", "-L", "8m", "-an", "-Zn", "rvg")
	t.Cleanup(func() { exec.Command("lvm", "vgremove", "-ff", "-y", "rvg").Run() })
	c := &Client{Config: withDF}
	record(t, c)

	// No devices file yet: Refresh only rescans.
	path, inUse, err := c.DevicesFile(ctx)
	if err != nil || inUse || path != "/etc/lvm/devices/system.devices" {
		t.Fatalf("DevicesFile: %q %v %v", path, inUse, err)
	}
	if _, err := c.Run(ctx, "lvmdevices", "-y", "--adddev", old); err != nil {
		t.Fatal(err)
	}
	if _, inUse, _ := c.DevicesFile(ctx); !inUse {
		t.Fatal("devices file not in use after lvmdevices --adddev")
	}
	p, err := c.Discover(ctx, old)
	if err != nil {
		t.Fatal(err)
	}

	newDev := moveWithCopy(t, old, other, "rcrypt", pvSize)
	// Before Refresh lvm, bound to the devices file, does not find the PV.
	if _, err := c.Discover(ctx, newDev); !errors.Is(err, ErrNotPV) {
		t.Errorf("Discover before Refresh: %v, want ErrNotPV (not in the devices file)", err)
	}
	before, _ := os.ReadFile(path)
	scene(c, "refresh")
	saveFixture(c, "devices-before", before)
	if err := c.Refresh(ctx, old, newDev); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	saveFixture(c, "devices-after", b)
	t.Logf("devices file after Refresh:\n%s", b)
	entries, err := ReadDevicesFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if e := c.findDevicesEntry(entries, newDev); e == nil || e.PVID != strings.ReplaceAll(p.UUID, "-", "") {
		t.Errorf("no entry for %s with PVID %s: %+v", newDev, p.UUID, entries)
	} else {
		t.Logf("new entry: %+v", *e)
	}
	if e := c.findDevicesEntry(entries, old); e != nil {
		t.Errorf("entry for %s still there: %+v", old, *e)
	}
	q, err := c.Discover(ctx, newDev)
	if err != nil {
		t.Fatalf("Discover after Refresh: %v", err)
	}
	if q.UUID != p.UUID || q.VG.Name != "rvg" || q.Name != newDev {
		t.Errorf("after Refresh: PV %s in %s named %s", q.UUID, q.VG.Name, q.Name)
	}
	// A second Refresh is a no-op.
	scene(c, "refresh-again")
	if err := c.Refresh(ctx, old, newDev); err != nil {
		t.Errorf("second Refresh: %v", err)
	}
	// Without a devices file: only the rescan and the check.
	os.Remove(path)
	if err := c.Refresh(ctx, old, newDev); err != nil {
		t.Errorf("Refresh without a devices file: %v", err)
	}
	// Refresh to a device that is no PV fails.
	if err := c.Refresh(ctx, "", old); !errors.Is(err, ErrNotPV) {
		t.Errorf("Refresh to a blank device: %v", err)
	}
}

// TestGuestActivate: activation restricted to a dm linear copy of a PV
// (same sectors, same label) maps the LVs onto the copy and never onto
// the raw disk, and refuses LVs whose PVs are not listed.
func TestGuestActivate(t *testing.T) {
	testvm.RequireGuest(t)
	ctx := context.Background()
	d := disks(t, 2)
	a, b := d[0], d[1]
	freshDisks(t, a, b)
	lvmSh(t, "pvcreate", "-q", a, b)
	lvmSh(t, "vgcreate", "-q", "avg", a, b)
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "ona", "-L", "8m", "avg", a)
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "onb", "-L", "8m", "avg", b)
	lvmSh(t, "lvcreate", "-q", "-y", "-n", "both", "-i", "2", "-L", "8m", "avg", a, b)
	t.Cleanup(func() { exec.Command("lvm", "vgremove", "-ff", "-y", "avg").Run() })
	// A pattern to read back through the copy.
	sh(t, "dd", "if=/dev/urandom", "of=/tmp/pattern", "bs=1M", "count=8", "status=none")
	sh(t, "dd", "if=/tmp/pattern", "of=/dev/mapper/avg-ona", "bs=1M", "oflag=direct", "status=none")
	lvmSh(t, "vgchange", "-an", "avg")

	n := sectorsOf(t, a)
	sh(t, "dmsetup", "create", "acopy", "--table", fmt.Sprintf("0 %d linear %s 0", n, a))
	defer exec.Command("dmsetup", "remove", "acopy").Run()
	copyDev, rawA := devOf(t, "/dev/mapper/acopy"), devOf(t, a)
	c := guestClient(t)

	// Only the copy: ona comes up on it; onb and both need b and are
	// refused, which is an error.
	scene(c, "activate-partial")
	err := c.Activate(ctx, "avg", []string{"/dev/mapper/acopy"})
	var ce *CommandError
	if !errors.As(err, &ce) || ce.ExitCode != ExitFailed {
		t.Errorf("Activate with b hidden: %v, want lvm exit %d", err, ExitFailed)
	}
	if tbl := sh(t, "dmsetup", "table", "avg-ona"); !strings.Contains(tbl, " "+copyDev.String()+" ") {
		t.Errorf("avg-ona maps %q, want the copy %v", tbl, copyDev)
	}
	for _, lv := range []string{"avg-onb", "avg-both"} {
		if _, err := os.Stat("/dev/mapper/" + lv); err == nil {
			t.Errorf("%s activated without its PV", lv)
		}
	}
	if got := sh(t, "sha256sum", "/dev/mapper/avg-ona"); !strings.HasPrefix(got, strings.Fields(sh(t, "sha256sum", "/tmp/pattern"))[0]) {
		t.Errorf("avg-ona through the copy reads different data")
	}
	lvmSh(t, "vgchange", "-an", "avg")

	// The copy and b: everything comes up, nothing on the raw disk a.
	scene(c, "activate")
	if err := c.Activate(ctx, "avg", []string{"/dev/mapper/acopy", b}); err != nil {
		t.Fatal(err)
	}
	for _, lv := range []string{"avg-ona", "avg-onb", "avg-both"} {
		tbl := sh(t, "dmsetup", "table", lv)
		if strings.Contains(tbl, " "+rawA.String()+" ") {
			t.Errorf("%s maps the raw disk: %q", lv, tbl)
		}
		t.Logf("%s: %s", lv, strings.TrimSpace(tbl))
	}
	if tbl := sh(t, "dmsetup", "table", "avg-both"); !strings.Contains(tbl, copyDev.String()) || !strings.Contains(tbl, devOf(t, b).String()) {
		t.Errorf("avg-both: %q", tbl)
	}
	lvmSh(t, "vgchange", "-an", "avg")

	// ActivateLVs, and the same under the fence.
	if err := c.ActivateLVs(ctx, "avg", []string{"ona"}, []string{"/dev/mapper/acopy"}); err != nil {
		t.Errorf("ActivateLVs: %v", err)
	}
	lvmSh(t, "vgchange", "-an", "avg")
	fe, err := c.LockVG(ctx, "avg", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := fe.Activate(ctx, []string{"/dev/mapper/acopy", b}); err != nil {
		t.Errorf("Fence.Activate: %v", err)
	}
	if tbl := sh(t, "dmsetup", "table", "avg-ona"); !strings.Contains(tbl, " "+copyDev.String()+" ") {
		t.Errorf("after Fence.Activate avg-ona maps %q", tbl)
	}
	if err := fe.Release(); err != nil {
		t.Fatal(err)
	}
}
