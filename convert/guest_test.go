package convert

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/luks"
	"github.com/dmconvert/dmconvert/testvm"
)

// Real-kernel tests of the engine, in-process: the engine drives the
// kernel's device-mapper through dmtable, LVM through the lvm tools and
// writes a real LUKS header.

const guestMiB = 1 << 20

// vmEngine (TestVM): the headline conversion in one boot (disk vda converted, vdb
// holds the journal and the writers' acknowledgements), then a fresh boot
// of the same disks where stock tools must open it.
func vmEngine(t *testing.T) {
	vmParallel(t)
	dir := t.TempDir()
	pv, state := filepath.Join(dir, "pv.img"), filepath.Join(dir, "state.img")
	if err := testvm.CreateDisk(pv, 512*guestMiB); err != nil {
		t.Fatal(err)
	}
	if err := testvm.CreateDisk(state, 256*guestMiB); err != nil {
		t.Fatal(err)
	}
	leg := filepath.Join(dir, "leg.img")
	if err := testvm.CreateDisk(leg, 64*guestMiB); err != nil {
		t.Fatal(err)
	}
	disks := []testvm.Disk{{Path: pv}, {Path: state}, {Path: leg}}
	testvm.RunTestsInGuest(t, testvm.Options{Disks: disks, Run: "^TestGuestEngineEncrypt$"})
	if !t.Failed() {
		testvm.RunTestsInGuest(t, testvm.Options{Disks: disks, Run: "^TestGuestEngineFreshBoot$"})
	}
	testvm.RunTestsInGuest(t, testvm.Options{Disks: disks, Run: "^TestGuestEngineLegWriteError$"})
}

var guestPass = []byte("correct horse battery staple")

func guestHeaderFactory(version int, header uint64) HeaderFactory {
	return func(key []byte, ss uint32) (HeaderFormat, error) {
		vk := luks.NewVolumeKeyFromBytes(key)
		defer vk.Wipe()
		o := luks.Options{Version: version, Cipher: "aes-xts-plain64", SectorSize: int(ss), HeaderSize: int64(header) * 512,
			PBKDF: luks.PBKDF{Type: luks.KDFArgon2id, Iterations: 4, MemoryKiB: 32768, Parallel: 1}}
		if version == 1 {
			o.PBKDF = luks.PBKDF{Type: luks.KDFPBKDF2, Iterations: 1000}
		}
		h, err := luks.Create(o, vk, guestPass)
		if err != nil {
			return nil, err
		}
		return NewLUKSHeader(h)
	}
}

// TestGuestEngineEncrypt converts a live PV (ext4 and xfs mounted, a raw
// LV, writers fsyncing all the time) and checks the result through the
// live stack, then through stock cryptsetup after tearing everything
// down, as a fresh boot would see the disk.
func TestGuestEngineEncrypt(t *testing.T) {
	testvm.RequireGuest(t)
	disks := testvm.GuestDisks()
	disk, stateDev := disks[0], disks[1]
	state := mountState(t, stateDev, true)
	const H = 32768 // 16 MiB
	st := buildStack(t, disk, state, H)
	e, closeSys, err := NewSystem()
	if err != nil {
		t.Fatal(err)
	}
	defer closeSys()
	var events []Event
	e.Progress = progressFunc(func(ev Event) { events = append(events, ev) })
	w := startWriterPaced(t, st, state, 5*time.Millisecond) // the heavy writer
	ctx := context.Background()
	ep, err := e.PlanEncrypt(ctx, EncryptOptions{
		Device: disk, Journal: filepath.Join(state, "run.journal"), HeaderSectors: H, KeyBytes: 64,
		NewHeader: guestHeaderFactory(2, H),
	})
	if err != nil {
		w.finish(t)
		t.Fatal(err)
	}
	if err := e.Execute(ctx, ep, RunOptions{}); err != nil {
		w.finish(t)
		t.Fatal(err)
	}
	acks, gap := w.finish(t)
	t.Logf("writer: %d acknowledged writes, longest write+fsync %v", acks, gap)
	var maxStall int64
	for _, ev := range events {
		maxStall = max(maxStall, int64(ev.Stall))
	}
	t.Logf("%d events, longest suspend %v", len(events), maxStall)
	name := filepath.Base(disk) + "_crypt"
	out := sh(t, "dmsetup", "table", name)
	if !strings.Contains(out, "crypt aes-xts-plain64") {
		t.Fatalf("final table of %s: %s", name, out)
	}
	pvs := sh(t, "pvs", "--noheadings", "-o", "pv_name,vg_name")
	if !strings.Contains(pvs, "/dev/mapper/"+name) {
		t.Fatalf("LVM does not see the PV on the mapping: %s", pvs)
	}
	verifyStack(t, st, state)
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "sync")
}

// TestGuestEngineFreshBoot (second boot of TestVM): nothing activates the
// VG from the raw disk; stock cryptsetup opens it with the passphrase;
// vgchange -ay; fsck clean with sizes checked; every file and every
// acknowledged record is there.
func TestGuestEngineFreshBoot(t *testing.T) {
	testvm.RequireGuest(t)
	disks := testvm.GuestDisks()
	disk := disks[0]
	state := mountState(t, disks[1], false)
	st := loadStack(t, state, "t")
	if out, err := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", disk); err != nil || strings.TrimSpace(out) != "crypto_LUKS" {
		t.Fatalf("blkid on %s: %q %v", disk, out, err)
	}
	shOK("pvscan", "--cache", "-aay")
	shOK("vgchange", "-ay", st.VG)
	if out, _ := shOK("dmsetup", "ls"); strings.Contains(out, st.VG+"-") {
		t.Fatalf("LVM activated %s from the raw encrypted disk:\n%s", st.VG, out)
	}
	writePW(t)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, filepath.Base(disk)+"_crypt")
	if out := sh(t, "cryptsetup", "status", filepath.Base(disk)+"_crypt"); !strings.Contains(out, "LUKS2") {
		t.Fatalf("cryptsetup status:\n%s", out)
	}
	sh(t, "vgchange", "-ay", st.VG)
	verifyStack(t, st, state)
}

type progressFunc func(Event)

func (f progressFunc) Event(ev Event) { f(ev) }

var _ = exec.Command
