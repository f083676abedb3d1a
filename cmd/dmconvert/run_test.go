package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/journal"
)

// The flags the guest end-to-end tests use, with a journal in the test's
// directory and a small header for the 8 MiB fake disk.
func (ta *testApp) encryptArgs(extra ...string) []string {
	args := []string{"encrypt", "--batch-mode", "--key-file", ta.keyFile("secret"), "--pbkdf", "pbkdf2",
		"--pbkdf-force-iterations", "1000", "--header-size", "1M", "--journal", filepath.Join(ta.dir, "run.journal")}
	return append(append(args, extra...), ta.sys.disk)
}

func diskBytes(t *testing.T, p string) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDryRunWritesNothing(t *testing.T) {
	for _, typ := range []string{"luks2", "luks1"} {
		t.Run(typ, func(t *testing.T) {
			ta := newTestApp(t)
			sys := ta.withDisk()
			before := diskBytes(t, sys.disk)
			hs := "1M"
			if typ == "luks1" {
				hs = "2M"
			}
			jp := filepath.Join(ta.dir, "run.journal")
			// No passphrase: stdin is empty and no key file is given.
			ta.mustRun(exitOK, "encrypt", "--dry-run", "--type", typ, "--header-size", hs, "--journal", jp, sys.disk)
			out := ta.out.String()
			for _, want := range []string{"Plan: encrypt " + sys.disk, "volume group vg0", "vg0/root (active)",
				"mapping:       /dev/mapper/vda.img_crypt", "journal:       " + jp, "writing the LUKS header", "encrypting", "finalizing", "Dry run: nothing was changed."} {
				if !strings.Contains(out, want) {
					t.Errorf("dry-run output lacks %q:\n%s", want, out)
				}
			}
			if strings.Contains(out, "WARNING") {
				t.Errorf("a journal on a disk gets a warning:\n%s", out)
			}
			if typ == "luks1" && !strings.Contains(out, "LUKS1, aes-xts-plain64, 512-bit key") {
				t.Errorf("LUKS1 plan:\n%s", out)
			}
			if !bytes.Equal(diskBytes(t, sys.disk), before) {
				t.Fatal("--dry-run changed the disk")
			}
			if _, err := os.Stat(jp); !os.IsNotExist(err) {
				t.Fatalf("--dry-run created the journal: %v", err)
			}
			if sys.created != 0 {
				t.Fatalf("--dry-run created %d devices", sys.created)
			}

			ta.mustRun(exitOK, "encrypt", "--dry-run", "--json", "--type", typ, "--header-size", hs, "--journal", jp, "--uuid", "01234567-89ab-4def-8123-456789abcdef", sys.disk)
			if n := strings.Count(strings.TrimSpace(ta.out.String()), "\n"); n != 0 {
				t.Fatalf("--dry-run --json printed %d lines, want one:\n%s", n+1, ta.out.String())
			}
			r := ta.jsonResult()
			if r["outcome"] != "planned" || r["exit_code"] != 0.0 || r["luks_uuid"] != "01234567-89ab-4def-8123-456789abcdef" || r["journal"] != jp {
				t.Fatalf("result: %v", r)
			}
			plan, ok := r["plan"].(map[string]any)
			if !ok || plan["op"] != "encrypt" || plan["name"] != "vda.img_crypt" {
				t.Fatalf("plan in the result: %v", r["plan"])
			}
		})
	}
}

// A journal on a memory file system (tmpfs, ramfs) is lost by the power
// cut it exists for: the plan says so, and so does --json; with --quiet,
// stderr.
func TestPlanWarnsOfAJournalInMemory(t *testing.T) {
	ta := newTestApp(t)
	sys := ta.withDisk()
	sys.memoryFS = "tmpfs"
	jp := filepath.Join(ta.dir, "run.journal")
	args := []string{"encrypt", "--dry-run", "--header-size", "1M", "--journal", jp, sys.disk}
	ta.mustRun(exitOK, args...)
	if out := ta.out.String(); !strings.Contains(out, "journal:       "+jp+"\n  WARNING:       the journal is on tmpfs, which a reboot or power cut empties") {
		t.Errorf("the plan does not warn of the journal on tmpfs:\n%s", out)
	}
	ta.mustRun(exitOK, append([]string{"--json"}, args...)...)
	if r := ta.jsonResult(); r["journal_fs"] != "tmpfs" {
		t.Errorf("--json result: journal_fs %v, want tmpfs", r["journal_fs"])
	}
	ta.mustRun(exitOK, append([]string{"--quiet"}, args...)...)
	if ta.out.Len() != 0 || !strings.Contains(ta.err.String(), "warning: journal "+jp+" is on tmpfs") {
		t.Errorf("--quiet: stdout %q, stderr %q", ta.out.String(), ta.err.String())
	}
}

func TestEncryptRefusedWritesNothing(t *testing.T) {
	ta := newTestApp(t)
	sys := ta.withDisk()
	before := diskBytes(t, sys.disk)
	// 20 MiB of PV plus two 16 MiB headers do not fit in 32 MiB.
	ta.mustRun(exitRefused, ta.encryptArgs("--header-size", "16M")...)
	if !strings.Contains(ta.err.String(), "sectors short") || !strings.HasPrefix(ta.err.String(), "dmconvert: ") {
		t.Fatalf("stderr: %q", ta.err.String())
	}
	if strings.Count(ta.err.String(), "dmconvert:") != 1 {
		t.Fatalf("error printed more than once: %q", ta.err.String())
	}
	if !bytes.Equal(diskBytes(t, sys.disk), before) || sys.created != 0 {
		t.Fatal("a refused run changed something")
	}
	// LUKS1's smallest header with checkpoint room (validate's minimum
	// agrees with the luks package), and one 4 KiB smaller.
	jp := filepath.Join(ta.dir, "j")
	ta.mustRun(exitOK, "encrypt", "--dry-run", "--type", "luks1", "--header-size", "2024K", "--journal", jp, sys.disk)
	ta.mustRun(exitRefused, "encrypt", "--dry-run", "--type", "luks1", "--header-size", "2020K", "--journal", jp, sys.disk)

	// A header LUKS1 cannot have on this disk (4096-byte logical blocks):
	// refused by the header factory, not a failure.
	sys.lbs = 4096
	ta.mustRun(exitRefused, "encrypt", "--dry-run", "--type", "luks1", "--journal", jp, sys.disk)
	if !strings.Contains(ta.err.String(), "LUKS1 supports only 512-byte sectors") {
		t.Fatalf("stderr: %q", ta.err.String())
	}
	ta.mustRun(exitOK, "encrypt", "--dry-run", "--header-size", "1M", "--journal", jp, sys.disk)
	if !strings.Contains(ta.out.String(), "4096-byte sectors") {
		t.Fatalf("LUKS2 on 4K sectors:\n%s", ta.out.String())
	}
	// Asking for another sector size than the disk's: refused by the
	// engine.
	ta.mustRun(exitRefused, "encrypt", "--dry-run", "--header-size", "1M", "--sector-size", "512", "--journal", jp, sys.disk)
	if !bytes.Equal(diskBytes(t, sys.disk), before) || sys.created != 0 {
		t.Fatal("a dry run changed something")
	}
}

func TestConfirmation(t *testing.T) {
	ta := newTestApp(t)
	sys := ta.withDisk()
	jp := filepath.Join(ta.dir, "run.journal")
	for _, answer := range []string{"yes\n", "", "NO\n"} {
		in := filepath.Join(ta.dir, "stdin")
		if err := os.WriteFile(in, []byte(answer+"secret\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(in)
		if err != nil {
			t.Fatal(err)
		}
		ta.a.stdin = f
		ta.mustRun(exitRefused, "encrypt", "--header-size", "1M", "--journal", jp, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", sys.disk)
		f.Close()
		if !strings.Contains(ta.err.String(), "Type 'yes' in capital letters") {
			t.Fatalf("no confirmation prompt: %q", ta.err.String())
		}
		if !strings.Contains(ta.out.String(), "Plan: encrypt") {
			t.Fatalf("no plan shown before the question:\n%s", ta.out.String())
		}
		if _, err := os.Stat(jp); !os.IsNotExist(err) || sys.created != 0 {
			t.Fatalf("answer %q: something was written", answer)
		}
	}
}

func TestConfirmedRunReadsPassphraseAfterYES(t *testing.T) {
	ta := newTestApp(t)
	sys := ta.withDisk()
	jp := filepath.Join(ta.dir, "run.journal")
	in := filepath.Join(ta.dir, "stdin")
	// Non-terminal stdin: the confirmation line, then one passphrase line.
	if err := os.WriteFile(in, []byte("YES\nsecret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(in)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ta.a.stdin = f
	ta.signal = []os.Signal{syscall.SIGINT}
	ta.mustRun(exitInterrupted, "encrypt", "--header-size", "1M", "--journal", jp, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", sys.disk)
	// The header in the journal opens with the passphrase read after YES.
	ta.signal = []os.Signal{syscall.SIGTERM}
	ta.mustRun(exitInterrupted, "resume", "--journal", jp, "--key-file", ta.keyFile("secret"))
	// A hang-up (the ssh session went away) stops at a safe point too.
	ta.signal = []os.Signal{syscall.SIGHUP}
	ta.mustRun(exitInterrupted, "resume", "--journal", jp, "--key-file", ta.keyFile("secret"))
	ta.mustRun(exitPassphrase, "resume", "--journal", jp, "--key-file", ta.keyFile("YES"))
}

// TestRunExitCodes drives encrypt, status, resume and abort in-process on
// the fake machine: a signal stops a run (5), a wrong key file (3), a
// journal held by another process (4), a run that fails (1).
func TestRunExitCodes(t *testing.T) {
	ta := newTestApp(t)
	sys := ta.withDisk()
	jp := filepath.Join(ta.dir, "run.journal")

	// The first signal stops the run at its first step boundary.
	ta.signal = []os.Signal{syscall.SIGINT, syscall.SIGINT}
	ta.mustRun(exitInterrupted, ta.encryptArgs("--json")...)
	out := ta.out.String()
	if !strings.Contains(out, `"message":"interrupt: stopping at the next safe point`) || !strings.Contains(out, "still finishing the current step") {
		t.Fatalf("signal notes missing from the JSON lines:\n%s", out)
	}
	r := ta.jsonResult()
	if r["outcome"] != "interrupted" || r["exit_code"] != 5.0 || r["journal"] != jp {
		t.Fatalf("result: %v", r)
	}
	if !strings.Contains(ta.err.String(), "dmconvert: interrupted") {
		t.Fatalf("stderr: %q", ta.err.String())
	}
	if sys.created != 0 {
		t.Fatal("the stopped run created devices")
	}

	// status needs no passphrase.
	ta.mustRun(exitOK, "status", "--journal", jp)
	for _, want := range []string{"status:    interrupted", "phase 1 of 7: setting up the mappings", "next:      dmconvert resume " + sys.disk} {
		if !strings.Contains(ta.out.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, ta.out.String())
		}
	}

	// A second encrypt on the same journal is refused.
	ta.signal = nil
	ta.mustRun(exitRefused, ta.encryptArgs()...)

	// Wrong key file (with encrypt's batch flags, which resume and abort
	// accept).
	ta.mustRun(exitPassphrase, "resume", "--batch-mode", "--journal", jp, "--key-file", ta.keyFile("wrong"))
	ta.mustRun(exitPassphrase, "abort", "-q", "--yes", "--json", "--journal", jp, "--key-file", ta.keyFile("wrong"))
	if r := ta.jsonResult(); r["outcome"] != "wrong-passphrase" || r["exit_code"] != 3.0 || r["command"] != "abort" {
		t.Fatalf("abort --json: %v", r)
	}

	// The journal held by another process: busy, for resume and abort.
	j, err := journal.Open(jp, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ta.mustRun(exitBusy, "resume", "--journal", jp, "--key-file", ta.keyFile("secret"))
	ta.mustRun(exitBusy, "abort", "--journal", jp, "--key-file", ta.keyFile("secret"))
	ta.mustRun(exitOK, "status", "--journal", jp, sys.disk)
	if !strings.Contains(ta.out.String(), "in progress by another process") || !strings.Contains(ta.out.String(), "carries LVM physical volume") {
		t.Fatalf("status of a held journal:\n%s", ta.out.String())
	}
	j.Close()

	// The disk held by another process: busy.
	unlock, err := convert.OSHost{LockDir: sys.lockDir}.Lock(convert.DiskInfo{Path: sys.disk, Dev: sys.dev})
	if err != nil {
		t.Fatal(err)
	}
	ta.mustRun(exitBusy, "resume", "--journal", jp, "--key-file", ta.keyFile("secret"))
	unlock()

	// The right key and no signal: the fake device mapper fails the first
	// step; the state is kept and the user is told what to do.
	ta.mustRun(exitFailed, "resume", "--journal", jp, "--key-file", ta.keyFile("secret"))
	if !strings.Contains(ta.err.String(), errNoDM.Error()) || !strings.Contains(ta.err.String(), "dmconvert resume "+sys.disk) {
		t.Fatalf("failure report: %q", ta.err.String())
	}
	ta.mustRun(exitOK, "status", "--json", "--journal", jp)
	r = ta.jsonResult()
	runs := r["runs"].([]any)
	run := runs[0].(map[string]any)["run"].(map[string]any)
	if run["status"] != journal.StatusFailed || !strings.Contains(run["message"].(string), errNoDM.Error()) {
		t.Fatalf("status after the failure: %v", run)
	}
}

func TestEncryptBusyDisk(t *testing.T) {
	ta := newTestApp(t)
	sys := ta.withDisk()
	unlock, err := convert.OSHost{LockDir: sys.lockDir}.Lock(convert.DiskInfo{Path: sys.disk, Dev: sys.dev})
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ta.mustRun(exitBusy, ta.encryptArgs()...)
}
