package convert

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

// Real-kernel tests of the header-gap decrypt (docs/design.md, "Decrypt
// without room"): a file system mounted directly on a LUKS2 or LUKS1
// mapping, and an LVM PV that fills its mapping, decrypted online under a
// writer; killed (SIGKILL) and resumed, stopped (SIGTERM) and aborted, or
// interrupted (SIGINT) and resumed. While stopped the disk shows no header
// and no file system; afterwards the file system is found on the raw disk
// itself (or LVM activates the VG from it), or, after an abort, stock
// cryptsetup opens the restored header with the passphrase.

// vmDecrypt (TestVMDecrypt) boots one VM for these tests.
func vmDecrypt(t *testing.T) {
	vmParallel(t)
	bin := testvm.BuildStatic(t, "./cmd/dmconvert")
	testvm.RunTestsInGuest(t, testvm.Options{
		// d[0] holds the journals (each keeps a header image of up to 16 MiB).
		Disks:   []testvm.Disk{{Size: 160 * guestMiB}, {Size: 64 * guestMiB}, {Size: 40 * guestMiB}, {Size: 96 * guestMiB}, {Size: 80 * guestMiB}, {Size: 64 * guestMiB}, {Size: 48 * guestMiB}},
		Run:     "^TestGuestDecrypt",
		Files:   map[string]string{"dmconvert": bin},
		Timeout: 15 * time.Minute,
	})
}

// fsUUID is what blkid -p finds on dev: its TYPE and UUID ("" when none).
func fsUUID(t testing.TB, dev string) (typ, uuid string) {
	t.Helper()
	out, _ := shOK("blkid", "-p", "-o", "export", dev)
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "TYPE="); ok {
			typ = v
		}
		if v, ok := strings.CutPrefix(l, "UUID="); ok {
			uuid = v
		}
	}
	return typ, uuid
}

// requireHidden: while a header-gap decrypt is stopped, neither a LUKS
// header nor a file system can be found on the disk.
func requireHidden(t testing.TB, disk string) {
	t.Helper()
	if out, err := shOK("cryptsetup", "isLuks", disk); err == nil {
		t.Fatalf("cryptsetup still sees a LUKS header on %s mid-run:\n%s", disk, out)
	}
	if typ, _ := fsUUID(t, disk); typ != "" {
		t.Fatalf("blkid -p finds %q on %s mid-run", typ, disk)
	}
}

// verifyDecryptedFS: the mapping name is a linear map of the whole start
// of disk; then, cold, the file system (the same UUID) is found on the raw
// disk and holds every file and acknowledged record.
func verifyDecryptedFS(t testing.TB, st *stack, state, name, uuid string) {
	t.Helper()
	table := sh(t, "dmsetup", "table", name)
	if f := strings.Fields(table); len(f) != 5 || f[2] != "linear" || f[4] != "0" {
		t.Fatalf("%s is not a linear map of the disk's start: %s", name, table)
	}
	verifyStack(t, st, state)
	if out := sh(t, "dmsetup", "ls"); strings.Contains(out, "dmconvert-") {
		t.Fatalf("helpers left after the decrypt:\n%s", out)
	}
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "dmsetup", "remove", name)
	if typ, u := fsUUID(t, st.Disk); typ != "ext4" || u != uuid {
		t.Fatalf("blkid -p %s: %q UUID %q, want ext4 UUID %q", st.Disk, typ, u, uuid)
	}
	restore := onRawDisk(t, st)
	defer restore()
	verifyStack(t, st, state)
}

// onRawDisk points st's file system at the raw disk, through a name
// verifyStack knows (a /dev/mapper/<VG>-plain link to the disk); restore
// unmounts it and puts st back.
func onRawDisk(t testing.TB, st *stack) (restore func()) {
	t.Helper()
	link := "/dev/mapper/" + st.VG + "-plain"
	if err := os.Symlink(st.Disk, link); err != nil {
		t.Fatal(err)
	}
	saved := *st
	st.FSLVs, st.Sizes = []string{"plain"}, []uint64{blockDevBytes(t, st.Disk)}
	return func() {
		for _, mp := range st.Mounts {
			shOK("umount", mp)
		}
		os.Remove(link)
		*st = saved
	}
}

// TestGuestDecryptFS: an ext4 mounted on a LUKS2 mapping (16 MiB header,
// no room after it) is decrypted under a writer: a dry run first, then a
// run killed with SIGKILL mid-way (the disk shows nothing, cryptsetup finds
// no header), resumed.
func TestGuestDecryptFS(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[0])
	writePW(t)
	st, name := fsOnMapping(t, "decfs", d[1], state)
	_, uuid := fsUUID(t, "/dev/mapper/"+name)
	j := st.file(state, "journal")
	code, out := cliRun(t, "decrypt", name, "--dry-run", "--key-file", pwFile, "--journal", j)
	requireExit(t, "dry run", code, 0, out)
	if !strings.Contains(out, "through the header area") || !strings.Contains(out, "no LVM physical volume") {
		t.Fatalf("the dry run does not show the header-gap plan:\n%s", out)
	}
	w := startWriter(t, st, state)
	r := cliStart(t, "decrypt", "/dev/mapper/"+name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "4M")
	r.waitProgress(t, 0.4)
	r.cmd.Process.Kill()
	code, _ = r.wait()
	requireExit(t, "decrypt after kill -9", code, 128+int(syscall.SIGKILL), "")
	requireHidden(t, st.Disk)
	code, out = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the decrypt", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyDecryptedFS(t, st, state, name, uuid)
}

// TestGuestDecryptFSAbortLUKS1: an ext4 on a LUKS1 mapping, decrypted
// under a writer, stopped with SIGTERM half way and aborted: the header
// comes back from the journal, and stock cryptsetup opens the disk with
// the passphrase and the same volume key.
func TestGuestDecryptFSAbortLUKS1(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[0])
	writePW(t)
	name := "decl1-crypt"
	sh(t, "cryptsetup", "luksFormat", "-q", "--type", "luks1", "--key-size", "256", "--pbkdf-force-iterations", "1000",
		"--key-file", pwFile, d[2])
	sh(t, "cryptsetup", "open", "--key-file", pwFile, d[2], name)
	st := fsStack(t, "decl1", d[2], state, name)
	oldKey := saveVolumeKey(t, st.Disk, "/tmp/decl1-old.key")
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	r := cliStart(t, "decrypt", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "1M")
	r.waitProgress(t, 0.5)
	r.cmd.Process.Signal(syscall.SIGTERM)
	code, errOut := r.wait()
	requireExit(t, "decrypt after SIGTERM", code, 5, errOut)
	requireHidden(t, st.Disk)
	code, out := cliRun(t, "abort", "--journal", j, "--key-file", pwFile)
	requireExit(t, "abort of the decrypt", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "cryptsetup", "close", name)
	if typ, _ := fsUUID(t, st.Disk); typ != "crypto_LUKS" {
		t.Fatalf("blkid -p %s after the abort: %q, want crypto_LUKS", st.Disk, typ)
	}
	sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, name)
	verifyStack(t, st, state)
	if k := saveVolumeKey(t, st.Disk, "/tmp/decl1-after.key"); string(k) != string(oldKey) {
		t.Fatal("the aborted decrypt changed the volume key")
	}
}

// TestGuestDecryptLVMNoRoom: a PV that fills its LUKS2 mapping (no working
// space after it, and no --shrink-pv) is decrypted through the header area
// under a writer, interrupted with SIGINT, resumed; the VG ends on the raw
// disk and activates from it cold.
func TestGuestDecryptLVMNoRoom(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[0])
	writePW(t)
	st, name := luksStack(t, "decnr", d[3], state)
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	r := cliStart(t, "decrypt", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "4M")
	r.waitProgress(t, 0.4)
	r.cmd.Process.Signal(syscall.SIGINT)
	code, errOut := r.wait()
	requireExit(t, "decrypt after SIGINT", code, 5, errOut)
	if out, err := shOK("cryptsetup", "isLuks", st.Disk); err == nil {
		t.Fatalf("cryptsetup still sees a LUKS header on %s mid-run:\n%s", st.Disk, out)
	}
	code, out := cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the decrypt", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyPlainCold(t, st, state, name)
}

// TestGuestDecryptSector4K: LUKS2 with 4096-byte encryption sectors on a
// disk of 512-byte sectors (cryptsetup --sector-size 4096), an ext4 on the
// mapping under a writer: rekeyed (kill -9, resume; the sector size kept,
// the old volume key opens nothing), then decrypted (SIGINT, resume; the
// file system, same UUID, on the raw disk with every write).
func TestGuestDecryptSector4K(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[0])
	writePW(t)
	disk := d[4]
	name := "s4k-crypt"
	sh(t, "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--sector-size", "4096", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pwFile, disk)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	t.Log(sh(t, "dmsetup", "table", name))
	st := fsStack(t, "s4k", disk, state, name)
	_, uuid := fsUUID(t, "/dev/mapper/"+name)
	oldKey := saveVolumeKey(t, disk, "/tmp/s4k-old.key")
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	killedAt(t, 0.4, "rekey", "rekey", "/dev/mapper/"+name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "2M")
	code, out := cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	tb := sh(t, "dmsetup", "table", name)
	t.Log(tb)
	if !strings.Contains(tb, "sector_size:4096") {
		t.Fatalf("rekeyed table lost the sector size: %s", tb)
	}
	st.Sizes[0] = blockDevBytes(t, "/dev/mapper/"+name)
	verifyStack(t, st, state)
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "cryptsetup", "close", name)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	if dump := sh(t, "cryptsetup", "luksDump", disk); !strings.Contains(dump, "sector: 4096") {
		t.Fatalf("luksDump after the rekey:\n%s", dump)
	}
	verifyStack(t, st, state)
	checkRekeyed(t, disk, oldKey, "/tmp/s4k-old.key")
	if !isMounted(st.Mounts[0]) {
		sh(t, "mount", "/dev/mapper/"+name, st.Mounts[0])
	}

	j2 := st.file(state, "journal2")
	w = startWriter(t, st, state)
	r := cliStart(t, "decrypt", "/dev/mapper/"+name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j2, "--chunk-size", "2M")
	r.waitProgress(t, 0.5)
	r.cmd.Process.Signal(syscall.SIGINT)
	code, errOut := r.wait()
	requireExit(t, "decrypt after SIGINT", code, 5, errOut)
	code, out = cliRun(t, "resume", "--journal", j2, "--key-file", pwFile)
	requireExit(t, "resume of the decrypt", code, 0, out)
	acks, _ = w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyDecryptedFS(t, st, state, name, uuid)
}

// TestGuestDecryptRandomKills: an ext4 on a LUKS2 mapping under a writer
// is rekeyed, then decrypted, each run killed -9 four times at random
// moments from each process's start (killRandomly), resumed to the end:
// after the rekey the old volume key opens nothing and every write is
// there; after the decrypt the file system, same UUID, is on the raw disk
// with every write.
func TestGuestDecryptRandomKills(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[0])
	writePW(t)
	rng := killRand(t)
	st, name := fsOnMapping(t, "deck", d[5], state)
	_, uuid := fsUUID(t, "/dev/mapper/"+name)
	oldKey := saveVolumeKey(t, st.Disk, "/tmp/deck-old.key")
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	killRandomly(t, rng, []string{"rekey", "/dev/mapper/" + name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "1M"}, resumeArgs(j), j, 4, 4*time.Second)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	st.Sizes[0] = blockDevBytes(t, "/dev/mapper/"+name) // the data area now starts one gap earlier
	verifyStack(t, st, state)
	checkRekeyed(t, st.Disk, oldKey, "/tmp/deck-old.key")

	j2 := st.file(state, "journal-decrypt")
	w = startWriter(t, st, state)
	killRandomly(t, rng, []string{"decrypt", "/dev/mapper/" + name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j2, "--chunk-size", "2M"}, resumeArgs(j2), j2, 4, 4*time.Second)
	acks, _ = w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyDecryptedFS(t, st, state, name, uuid)
}

// TestGuestDecryptInterruptedCreate: an ext4 on a LUKS2 mapping is
// decrypted under a writer and stopped (SIGTERM); everything is torn down
// as by a reboot; then the devices a resume killed inside its creates
// leaves are made: the run's first helper and the mapping, each created
// with its name (and the helper with its UUID) but no table, as the
// kernel keeps a device whose creator died between the create and its
// first table (a kill while dm-crypt starts its threads fails that load
// with EINTR; seen in CI). The kernel adds no block device for them, so
// a table that uses one fails with ENXIO. Resume must drop them and
// finish; the file system, same UUID, is then on the raw disk with every
// acknowledged write.
func TestGuestDecryptInterruptedCreate(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[0])
	writePW(t)
	st, name := fsOnMapping(t, "decic", d[6], state)
	_, uuid := fsUUID(t, "/dev/mapper/"+name)
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	r := cliStart(t, "decrypt", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", j, "--chunk-size", "2M")
	r.waitProgress(t, 0.4)
	r.cmd.Process.Signal(syscall.SIGTERM)
	code, errOut := r.wait()
	requireExit(t, "decrypt after SIGTERM", code, 5, errOut)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	var helper, helperUUID string
	for _, l := range strings.Split(sh(t, "dmsetup", "info", "-c", "--noheadings", "--separator", " ", "-o", "name,uuid"), "\n") {
		if f := strings.Fields(l); len(f) == 2 && strings.HasPrefix(f[0], "dmconvert-") && (helper == "" || f[0] < helper) {
			helper, helperUUID = f[0], f[1]
		}
	}
	if helper == "" {
		t.Fatal("no helper device mid-run")
	}
	// A reboot: nothing is mapped any more.
	sh(t, "umount", st.Mounts[0])
	sh(t, "dmsetup", "remove", name)
	for _, l := range strings.Split(sh(t, "dmsetup", "ls"), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "dmconvert-") {
			sh(t, "dmsetup", "remove", f[0])
		}
	}
	requireHidden(t, st.Disk)
	sh(t, "dmsetup", "create", helper, "--uuid", helperUUID, "--notable")
	sh(t, "dmsetup", "create", name, "--notable")
	t.Logf("left without a table: %s (uuid %s) and %s\n%s", helper, helperUUID, name, sh(t, "dmsetup", "info", helper))
	code, out := cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume after the interrupted creates", code, 0, out)
	sh(t, "mount", "/dev/mapper/"+name, st.Mounts[0])
	verifyDecryptedFS(t, st, state, name, uuid)
}
