package lvm

import (
	"os"
	"path/filepath"
	"testing"
)

// A fake sysfs and /dev: image files stand in for the devices.
func TestLocatePV(t *testing.T) {
	head, err := os.ReadFile("../convert/testdata/pv-head-4k.bin")
	if err != nil {
		t.Fatal(err)
	}
	l, err := ParseLabel(head)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	sys, dev := filepath.Join(root, "sys"), filepath.Join(root, "dev")
	defer func(s, d string) { sysBlockDir, devDir = s, d }(sysBlockDir, devDir)
	sysBlockDir, devDir = sys, dev
	mk := func(name string, content []byte, dmName, dmUUID string) {
		os.MkdirAll(filepath.Join(sys, name), 0o755)
		p := filepath.Join(dev, name)
		if dmName != "" {
			os.MkdirAll(filepath.Join(sys, name, "dm"), 0o755)
			os.WriteFile(filepath.Join(sys, name, "dm", "name"), []byte(dmName+"\n"), 0o644)
			os.WriteFile(filepath.Join(sys, name, "dm", "uuid"), []byte(dmUUID+"\n"), 0o644)
			p = filepath.Join(dev, "mapper", dmName)
		}
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, content, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	blank := make([]byte, 4096)
	mk("vda", blank, "", "")
	mk("dm-0", head, "helper", "DMCONVERT-abc-new") // a private copy: skipped
	mk("vdc", head, "", "")                         // the PV, under a new name
	mk("dm-1", blank, "vg-lv", "LVM-xyz")
	mk("dm-2", head, "frozen", "LVM-abc") // suspended: never read
	os.WriteFile(filepath.Join(sys, "dm-2", "dm", "suspended"), []byte("1\n"), 0o644)

	if got := LocatePV(l.UUID, filepath.Join(dev, "vdb"), "DMCONVERT-"); got != filepath.Join(dev, "vdc") {
		t.Fatalf("LocatePV found %q, want %s/vdc", got, dev)
	}
	// The hint is taken when it carries the label.
	if got := LocatePV(l.UUID, filepath.Join(dev, "mapper", "helper")); got != filepath.Join(dev, "mapper", "helper") {
		t.Fatalf("LocatePV with a good hint found %q", got)
	}
	// An unknown UUID is "".
	if got := LocatePV("no-such-uuid", "", "DMCONVERT-"); got != "" {
		t.Fatalf("LocatePV of an unknown UUID found %q", got)
	}
	os.Remove(filepath.Join(dev, "vdc"))
	if got := LocatePV(l.UUID, "", "DMCONVERT-"); got != "" {
		t.Fatalf("LocatePV found %q though only a skipped private device carries the label", got)
	}
}
