package lvm

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// devicesDir makes an LVM_SYSTEM_DIR holding the recorded devices file.
func devicesDir(t *testing.T, content []byte) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "devices"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "devices", "system.devices"), content, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Recorded: PV of VG rvg moved from /dev/vdd to /dev/mapper/rcrypt (a dm
// device with a CRYPT- uuid), devices file in use (guest TestGuestRefresh).
func TestReplayRefresh(t *testing.T) {
	r := loadReplay(t, "refresh")
	before, err := os.ReadFile(filepath.Join(r.dir, "devices-before"))
	if err != nil {
		t.Fatal(err)
	}
	c := r.client()
	c.Env = []string{"LVM_SYSTEM_DIR=" + devicesDir(t, before)}
	// Refresh removes the old entry by PVID, adds the new device, rescans
	// and checks; then the guest test discovered the PV on the new device.
	if err := c.Refresh(bg, "/dev/vdd", "/dev/mapper/rcrypt"); err != nil {
		t.Fatal(err)
	}
	// What lvm wrote: the new entry with the crypt_uuid device ID. The
	// guest test looked the two devices up in it (by name, then by
	// device number: /dev/vdd is not /dev/mapper/rcrypt).
	after, err := os.ReadFile(filepath.Join(r.dir, "devices-after"))
	if err != nil {
		t.Fatal(err)
	}
	es := parseDevicesFile(string(after))
	if len(es) != 1 || es[0].IDType != "crypt_uuid" || es[0].DevName != "/dev/mapper/rcrypt" || es[0].PVID != "ucDfWz7cxHQ3epe72rhdQiPAz3kfPKad" {
		t.Errorf("devices file after: %+v", es)
	}
	if e := c.findDevicesEntry(es, "/dev/mapper/rcrypt"); e != &es[0] {
		t.Errorf("entry of the new device: %+v", e)
	}
	if e := c.findDevicesEntry(es, "/dev/vdd"); e != nil {
		t.Errorf("entry of the old device: %+v", e)
	}
	p, err := c.Discover(bg, "/dev/mapper/rcrypt")
	r.done()
	if err != nil {
		t.Fatal(err)
	}
	if p.VG.Name != "rvg" || p.Name != "/dev/mapper/rcrypt" {
		t.Errorf("after Refresh: %s in %s", p.Name, p.VG.Name)
	}
}

func TestReplayRefreshAgain(t *testing.T) {
	r := loadReplay(t, "refresh-again")
	after, err := os.ReadFile(filepath.Join("testdata", "replay", "refresh", "devices-after"))
	if err != nil {
		t.Fatal(err)
	}
	c := r.client()
	sys := devicesDir(t, after)
	c.Env = []string{"LVM_SYSTEM_DIR=" + sys}
	// Already listed, old entry gone: only the rescan and the check.
	if err := c.Refresh(bg, "/dev/vdd", "/dev/mapper/rcrypt"); err != nil {
		t.Fatal(err)
	}
	// Without a devices file.
	os.Remove(filepath.Join(sys, "devices", "system.devices"))
	if err := c.Refresh(bg, "/dev/vdd", "/dev/mapper/rcrypt"); err != nil {
		t.Fatal(err)
	}
	// To a device without a label.
	err = c.Refresh(bg, "", "/dev/vdd")
	r.done()
	if !errors.Is(err, ErrNotPV) {
		t.Errorf("Refresh to a blank device: %v", err)
	}
}

func TestParseDevicesFile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "replay", "refresh", "devices-before"))
	if err != nil {
		t.Fatal(err)
	}
	es := parseDevicesFile(string(b))
	want := []DevicesEntry{{IDType: "devname", IDName: ".", DevName: "/dev/vdd", PVID: "ucDfWz7cxHQ3epe72rhdQiPAz3kfPKad"}}
	if !slices.Equal(es, want) {
		t.Errorf("parsed %+v, want %+v", es, want)
	}
	es = parseDevicesFile("# x\nVERSION=1.1.4\nSYSTEMID=host\nIDTYPE=sys_wwid IDNAME=naa.600 DEVNAME=/dev/sda PVID=abc PART=2\n\n")
	if len(es) != 1 || es[0].Part != "2" || es[0].IDType != "sys_wwid" || es[0].DevName != "/dev/sda" {
		t.Errorf("parsed %+v", es)
	}
}

func TestReplayActivate(t *testing.T) {
	r := loadReplay(t, "activate-partial")
	err := r.client().Activate(bg, "avg", []string{"/dev/mapper/acopy"})
	r.done()
	var ce *CommandError
	if !errors.As(err, &ce) || ce.ExitCode != ExitFailed {
		t.Errorf("Activate with a PV hidden: %v", err)
	}
	r = loadReplay(t, "activate")
	c := r.client()
	if err := c.Activate(bg, "avg", []string{"/dev/mapper/acopy", "/dev/vdb"}); err != nil {
		t.Fatal(err)
	}
	if err := c.ActivateLVs(bg, "avg", []string{"ona"}, []string{"/dev/mapper/acopy"}); err != nil {
		t.Fatal(err)
	}
	// The rest of the scene is the fenced activation (fence_test.go).
}

func TestActivateArgs(t *testing.T) {
	var got [][]string
	c := &Client{Devices: []string{"/dev/other"}}
	c.exec = func(_ ctxT, argv, _ []string) ([]byte, []byte, int, error) {
		got = append(got, argv)
		return nil, nil, 0, nil
	}
	if err := c.Activate(bg, "vg", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.ActivateLVs(bg, "vg", []string{"a", "b"}, []string{"/dev/x"}); err != nil {
		t.Fatal(err)
	}
	want := [][]string{
		{"lvm", "vgchange", "--devices", "/dev/other", "-ay", "--activationmode", "complete", "--", "vg"},
		{"lvm", "lvchange", "--devices", "/dev/x", "-ay", "-K", "--activationmode", "complete", "--", "vg/a", "vg/b"},
	}
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("argv %q, want %q", got, want)
	}
	for _, bad := range []string{"", "-vg", "a/b", ".."} {
		if err := c.Activate(bg, bad, nil); err == nil {
			t.Errorf("Activate(%q) accepted", bad)
		}
	}
	if err := c.ActivateLVs(bg, "vg", []string{"x/../y"}, nil); err == nil {
		t.Error("ActivateLVs accepted a bad LV name")
	}
	if err := c.ActivateLVs(bg, "vg", nil, nil); err == nil {
		t.Error("ActivateLVs with no LV accepted")
	}
}
