package lvm

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

type ctxT = context.Context

func TestArgv(t *testing.T) {
	c := &Client{Binary: "/sbin/lvm", Config: `global { x=1 }`, Devices: []string{"/dev/a", "/dev/b"}}
	got := c.argv(call{cmd: "pvs", args: []string{"-o", "pv_name"}, lock: lockNone, devices: true})
	want := []string{"/sbin/lvm", "pvs", "--config", `global { x=1 }`, "--devices", "/dev/a", "--devices", "/dev/b", "--nolocking", "-o", "pv_name"}
	if !slices.Equal(got, want) {
		t.Errorf("argv %q, want %q", got, want)
	}
	got = (&Client{}).argv(call{cmd: "lvmconfig", args: []string{"x"}, devices: false})
	if !slices.Equal(got, []string{"lvm", "lvmconfig", "x"}) {
		t.Errorf("argv %q", got)
	}
	// Devices never reach commands that do not scan.
	got = c.argv(call{cmd: "lvmdevices", args: []string{"--adddev", "/dev/x"}})
	if slices.Contains(got, "--devices") {
		t.Errorf("lvmdevices got --devices: %q", got)
	}
}

// A real process: a fake "lvm" script that prints on both streams and
// exits with the code it is told; environment and stdin as documented.
func TestRunProcess(t *testing.T) {
	dir := t.TempDir()
	fake := filepath.Join(dir, "lvm")
	script := `#!/bin/sh
echo "out:$1:$LC_ALL:$LVM_SUPPRESS_FD_WARNINGS:$EXTRA"
read line && echo "stdin not empty"
echo "  first problem  " >&2
echo "second problem" >&2
exit "$2"
`
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	var traced []string
	c := &Client{Binary: fake, Env: []string{"EXTRA=yes"}, Trace: func(args []string, stdout, stderr []byte, code int) {
		traced = append(traced, strings.Join(args, " "))
	}}
	out, err := c.Run(bg, "vgs", "0")
	if err != nil || string(out) != "out:vgs:C:1:yes\n" {
		t.Errorf("Run = %q, %v", out, err)
	}
	out, err = c.Run(bg, "vgs", "5")
	var ce *CommandError
	if !errors.As(err, &ce) || ce.ExitCode != ExitFailed || !errors.Is(err, ErrCommandFailed) {
		t.Fatalf("exit 5: %v", err)
	}
	if ce.Stderr != "first problem; second problem" || string(out) != "out:vgs:C:1:yes\n" || ce.Args[1] != "vgs" {
		t.Errorf("CommandError %+v, stdout %q", ce, out)
	}
	if !strings.Contains(err.Error(), "exit status 5") || !strings.Contains(err.Error(), "second problem") {
		t.Errorf("message %q", err)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		t.Errorf("the exit code is carried by CommandError, not an ExitError: %v", ee)
	}
	if len(traced) != 2 {
		t.Errorf("Trace saw %q", traced)
	}
	// A missing binary.
	_, err = (&Client{Binary: filepath.Join(dir, "nope")}).Run(bg, "vgs")
	if !errors.As(err, &ce) || ce.ExitCode != -1 || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing binary: %v", err)
	}
	// A cancelled context says so.
	ctx, cancel := context.WithCancel(bg)
	cancel()
	if _, err := c.Run(ctx, "vgs", "0"); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
}

func TestParseConfigOutput(t *testing.T) {
	out := []byte("locking_dir=\"/run/lock/lvm\"\nprioritise_write_locks=1\nfilter=[\"a|^/dev/vd.*|\",\"r|.*|\"]\n")
	m, err := parseConfigOutput(out, []string{"global/locking_dir", "global/prioritise_write_locks", "devices/filter"})
	if err != nil {
		t.Fatal(err)
	}
	if m["global/locking_dir"] != "/run/lock/lvm" || m["global/prioritise_write_locks"] != "1" || m["devices/filter"] != `["a|^/dev/vd.*|","r|.*|"]` {
		t.Errorf("parsed %q", m)
	}
	if _, err := parseConfigOutput(out, []string{"global/wait_for_locks"}); !errors.Is(err, ErrBadReport) {
		t.Errorf("missing key: %v", err)
	}
	if _, err := parseConfigOutput([]byte("no equals sign\n"), nil); !errors.Is(err, ErrBadReport) {
		t.Errorf("bad line: %v", err)
	}
	// Recorded in the guest (devices/use_devicesfile, devices/devicesfile).
	b, err := os.ReadFile(filepath.Join("testdata", "replay", "refresh", "002-lvm.stdout"))
	if err != nil {
		t.Fatal(err)
	}
	m, err = parseConfigOutput(b, []string{"devices/use_devicesfile", "devices/devicesfile"})
	if err != nil || m["devices/use_devicesfile"] != "1" || m["devices/devicesfile"] != "system.devices" {
		t.Errorf("recorded lvmconfig: %q %v", m, err)
	}
}

func TestFieldReader(t *testing.T) {
	f := &fieldReader{kind: "pv", row: map[string]string{"a": "12", "b": "x", "c": "1", "d": "2", "e": "-1", "empty": ""}}
	if f.u64("a") != 12 || f.err != nil {
		t.Fatal(f.err)
	}
	if f.i64("e") != -1 || f.u64("empty") != 0 || f.i64("empty") != -1 || f.flag("e") || f.flag("empty") || !f.flag("c") || f.err != nil {
		t.Fatal(f.err)
	}
	if _, ok := f.dev("e", "a"); ok {
		t.Error("dev with major -1 is valid")
	}
	f.u64("b")
	if !errors.Is(f.err, ErrBadReport) || !strings.Contains(f.err.Error(), "pv field b") {
		t.Errorf("non-numeric: %v", f.err)
	}
	f = &fieldReader{kind: "lv", row: map[string]string{}}
	f.str("lv_name")
	if !errors.Is(f.err, ErrBadReport) {
		t.Errorf("missing field: %v", f.err)
	}
	f = &fieldReader{kind: "lv", row: map[string]string{"x": "2"}}
	f.flag("x")
	if !errors.Is(f.err, ErrBadReport) {
		t.Errorf("flag 2: %v", f.err)
	}
	if _, err := parseReport([]byte("not json")); !errors.Is(err, ErrBadReport) {
		t.Errorf("parseReport: %v", err)
	}
}

func TestParseAreas(t *testing.T) {
	vg := &VG{Name: "vg", PVs: []VGPV{{Name: "/dev/vda", UUID: "A"}, {Name: "[unknown]", UUID: "M1", Missing: true}, {Name: "[unknown]", UUID: "M2", Missing: true}},
		LVs: []*LV{{Name: "r_rimage_0"}}}
	got, err := parseAreas("/dev/vda(10),r_rimage_0(0),[unknown](3)", vg)
	if err != nil {
		t.Fatal(err)
	}
	want := []SegmentArea{{PV: "/dev/vda", PVUUID: "A", Start: 10}, {LV: "r_rimage_0"}, {PV: "[unknown]", Start: 3}}
	if !slices.Equal(got, want) {
		t.Errorf("areas %+v, want %+v", got, want)
	}
	for _, bad := range []string{"/dev/vda", "/dev/vda(x)", "(3)", "nosuchlv(0)"} {
		if _, err := parseAreas(bad, vg); !errors.Is(err, ErrBadReport) {
			t.Errorf("parseAreas(%q): %v", bad, err)
		}
	}
	if a, err := parseAreas("", vg); a != nil || err != nil {
		t.Errorf("empty: %v %v", a, err)
	}
}

// assemble refuses reports whose extent map does not add up.
func TestAssembleChecksSegments(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "replay", "discover-mixed-a", "003-lvm.stdout"))
	if err != nil {
		t.Fatal(err)
	}
	rep, err := parseReport(b)
	if err != nil {
		t.Fatal(err)
	}
	pvUUID := rep.Report[0]["pv"][0]["pv_uuid"]
	vgUUID := rep.Report[0]["vg"][0]["vg_uuid"]
	if _, err := assemble("/dev/vda", devZero, pvUUID, vgUUID, rep, nil); err != nil {
		t.Fatalf("recorded report: %v", err)
	}
	// Drop one pvseg row of the PV: a gap.
	rows := rep.Report[0]["pvseg"]
	for i, r := range rows {
		if r["pv_uuid"] == pvUUID && r["pvseg_start"] != "0" {
			rep.Report[0]["pvseg"] = append(rows[:i:i], rows[i+1:]...)
			break
		}
	}
	if _, err := assemble("/dev/vda", devZero, pvUUID, vgUUID, rep, nil); !errors.Is(err, ErrBadReport) {
		t.Errorf("report with a gap: %v", err)
	}
	if _, err := assemble("/dev/vda", devZero, pvUUID, "other-vg", rep, nil); !errors.Is(err, ErrBadReport) {
		t.Errorf("VG not in the report: %v", err)
	}
}
