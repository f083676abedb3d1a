package convert

import (
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/dmtable"
)

// TestOSHostLockHolder: LockHolder finds the process holding a disk's run
// lock from /proc/locks without taking it (a plan must never make a run
// starting beside it find the lock taken), and nothing once it is gone.
func TestOSHostLockHolder(t *testing.T) {
	h := OSHost{LockDir: t.TempDir()}
	disk := dmtable.Dev{Major: 254, Minor: 16}
	if pid, held := h.LockHolder(disk); held {
		t.Fatalf("no lock file yet, but held by %d", pid)
	}
	unlock, err := h.Lock(DiskInfo{Dev: disk, Path: "/dev/vdb"})
	if err != nil {
		t.Fatal(err)
	}
	if pid, held := h.LockHolder(disk); !held || pid != os.Getpid() {
		t.Fatalf("LockHolder = %d, %v; want this process %d", pid, held, os.Getpid())
	}
	// LockHolder took nothing: the lock is still this process's only, and
	// once released another process can take it.
	if pid, held := h.LockHolder(dmtable.Dev{Major: 254, Minor: 32}); held {
		t.Fatalf("another disk's lock held by %d", pid)
	}
	unlock()
	if pid, held := h.LockHolder(disk); held {
		t.Fatalf("released, but held by %d", pid)
	}
	// Held by another process (flock(1), from util-linux).
	cmd := exec.Command("flock", "-x", h.lockFile(disk), "sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var pid int
	var held bool
	for i := 0; i < 100 && !held; i++ {
		time.Sleep(20 * time.Millisecond)
		pid, held = h.LockHolder(disk)
	}
	// flock(1) locks, then execs sleep: the holder is its PID.
	if !held || pid != cmd.Process.Pid {
		t.Fatalf("LockHolder = %d, %v; want flock's %d", pid, held, cmd.Process.Pid)
	}
	if _, err := h.Lock(DiskInfo{Dev: disk, Path: "/dev/vdb"}); err == nil {
		t.Fatal("Lock succeeded while another process holds the lock")
	}
}
