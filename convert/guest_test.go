package convert

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/luks"
	"github.com/dmconvert/dmconvert/testvm"
)

// Real-kernel tests of the engine, in-process: the engine drives the
// kernel's device-mapper through dmtable, LVM through the lvm tools and
// writes a real LUKS header.

const guestMiB = 1 << 20

// TestVM runs this package's guest tests in the VM: disk vda is
// converted, vdb holds the journal and the writer's acknowledgements.
func TestVM(t *testing.T) {
	testvm.RunTestsInGuest(t, testvm.Options{
		Disks: []testvm.Disk{{Size: 512 * guestMiB}, {Size: 64 * guestMiB}},
		Run:   "^TestGuestEngine",
	})
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
	w := startWriter(t, st, state)
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

	// Tear down and open it like a fresh boot would.
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "vgchange", "-an", st.VG)
	sh(t, "dmsetup", "remove", name)
	if out, err := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", disk); err != nil || strings.TrimSpace(out) != "crypto_LUKS" {
		t.Fatalf("blkid on %s: %q %v", disk, out, err)
	}
	pw := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(pw, guestPass, 0o600)
	sh(t, "cryptsetup", "open", "--key-file", pw, disk, "opened")
	sh(t, "vgchange", "-ay", st.VG)
	verifyStack(t, st, state)
}

type progressFunc func(Event)

func (f progressFunc) Event(ev Event) { f(ev) }

var _ = exec.Command
