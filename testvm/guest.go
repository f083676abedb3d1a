package testvm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Environment variables shared by the host side and the guest side.
const (
	// EnvGuest is "1" inside the VM (set by RunTestsInGuest and by Run for
	// every guest script).
	EnvGuest = "DMCONVERT_GUEST"
	// EnvVM is "1" when the host asks for real-kernel tests (make test).
	EnvVM = "DMCONVERT_VM"
	// EnvGuestDisks lists the guest device paths of the disks, comma
	// separated, in the order they were given.
	EnvGuestDisks = "DMCONVERT_GUEST_DISKS"
	// EnvGuestShare is the guest path of the 9p share.
	EnvGuestShare = "DMCONVERT_GUEST_SHARE"
	// EnvReportDir, when set on the host, is where RunTestsInGuest writes
	// one JSON report per run.
	EnvReportDir = "DMCONVERT_VM_REPORT_DIR"
	// EnvLog=1 on the host shows the output of guest tests that pass
	// too (their t.Logf lines), not only of those that fail.
	EnvLog = "DMCONVERT_VM_LOG"
	// EnvBench, when set on the host, is the -test.bench regexp used by
	// RunTestsInGuest when Options.Bench is empty (make bench).
	EnvBench = "DMCONVERT_VM_BENCH"
	// EnvRun, when set on the host, replaces Options.Run (to run one
	// guest test: DMCONVERT_VM_RUN='^TestGuestHarness$').
	EnvRun = "DMCONVERT_VM_RUN"
	// EnvKeep, when "1" on the host, keeps the work directory (share,
	// disk images, console log) of every run, not only of failed ones.
	EnvKeep = "DMCONVERT_VM_KEEP"
)

// GuestShare is where the 9p share is mounted inside the guest. Guest
// scripts start with this as their working directory.
const GuestShare = "/share"

// InGuest reports whether the caller runs inside the test VM.
func InGuest() bool { return os.Getenv(EnvGuest) == "1" }

// VMRequested reports whether the host asked for real-kernel tests
// (DMCONVERT_VM=1, set by make test).
func VMRequested() bool { return os.Getenv(EnvVM) == "1" }

// RequireGuest skips the test on the host. Inside the VM it does nothing.
// Every TestGuest* test starts with it.
func RequireGuest(t testing.TB) {
	t.Helper()
	if !InGuest() {
		t.Skip("guest-only test: runs inside the test VM (make test, or DMCONVERT_VM=1 go test -run TestVM)")
	}
}

// RequireVM skips a host-side test that boots VMs itself (with Start or
// Run) unless real-kernel tests were requested, and inside the guest.
func RequireVM(t testing.TB) {
	t.Helper()
	if !VMRequested() {
		t.Skip("real-kernel test not requested (set DMCONVERT_VM=1, as make test does)")
	}
	if InGuest() {
		t.Skip("already inside the test VM")
	}
}

// GuestDisks returns, inside the guest, the device paths of
// Options.Disks (or Config.Disks) in the order they were given:
// /dev/vda, /dev/vdb, ... On the host it returns nil.
func GuestDisks() []string {
	v := os.Getenv(EnvGuestDisks)
	if v == "" {
		return nil
	}
	return strings.Split(v, ",")
}

// GuestFilesDir is where, inside the guest, RunTestsInGuest puts the
// Options.Files (a tmpfs copy: executing from the 9p share costs seconds).
const GuestFilesDir = "/run/testvm/files"

// guestRunDir holds the guest's copy of the test binary.
const guestRunDir = "/run/testvm"

// GuestFile returns the guest path of a file passed in with
// Options.Files (name is the key used there). On the host it returns "".
func GuestFile(name string) string {
	if !InGuest() {
		return ""
	}
	return filepath.Join(GuestFilesDir, name)
}

// guestDiskNames returns the device paths the guest will see for n
// virtio disks: vda..vdz, vdaa, ...
func guestDiskNames(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = "/dev/vd" + diskSuffix(i)
	}
	return out
}

// diskSuffix mirrors the kernel's virtio_blk naming (sd-style): 0 -> a,
// 25 -> z, 26 -> aa.
func diskSuffix(i int) string {
	s := ""
	for {
		s = string(rune('a'+i%26)) + s
		i = i/26 - 1
		if i < 0 {
			return s
		}
	}
}
