//go:build linux

package dmtable

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// suspenderEnv makes the test binary the process killed mid-suspend in
// TestGuestSuspendHelperSurvivesKill: started with it set to a device
// name, the binary suspends that device through a Client with the
// suspend helper, before any test runs, and waits to be killed.
const suspenderEnv = "DMTABLE_TEST_SUSPENDER"

func init() {
	name := os.Getenv(suspenderEnv)
	if name == "" || os.Getenv(suspendHelperEnv) != "" {
		return // not the suspender, or its suspend helper
	}
	c, err := Open(Options{Udev: UdevOff, SuspendHelper: true})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	fmt.Println("suspending")
	_, err = c.Suspend(name, 0)
	fmt.Println("suspended:", err)
	os.Exit(0)
}

// suspendHelperPids lists the processes named as the suspend helper.
func suspendHelperPids(t testing.TB) []int {
	t.Helper()
	comms, _ := filepath.Glob("/proc/[0-9]*/comm")
	var pids []int
	for _, p := range comms {
		b, err := os.ReadFile(p)
		if err != nil || strings.TrimSpace(string(b)) != "dmtable-suspend" {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(p, "/proc/%d/comm", &pid); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestGuestSuspendHelperSurvivesKill kills a process while its suspend of
// a mirror waits for in-flight I/O (the write is held by dm-delay), then
// checks what Options.SuspendHelper promises: the helper finishes the
// suspend, so the mirror is suspended, not broken; it resumes, and a
// later suspend returns (without the helper, the kernel leaves the
// mirror's region-recovery slots taken and that suspend blocks for ever:
// dm-raid1 has no presuspend_undo).
func TestGuestSuspendHelperSurvivesKill(t *testing.T) {
	c, a, b := guestSetup(t)
	const n = 32768
	delayName, name := "dmt-kill-delay", "dmt-kill-mirror"
	dmsetup(t, "create", delayName, "--table", fmt.Sprintf("0 %d delay %d:%d 0 0 %d:%d 0 8000", n, b.Major, b.Minor, b.Major, b.Minor))
	cleanupDevice(t, c, delayName)
	dmsetup(t, "create", name, "--table", fmt.Sprintf("0 %d mirror core 2 64 nosync 2 %d:%d 0 /dev/mapper/%s 0", n, a.Major, a.Minor, delayName))
	cleanupDevice(t, c, name)

	// One write, held 8 s by the delay under the second leg (the
	// suspending process and its helper start within it, even on a busy
	// emulated CPU).
	wdone := make(chan error, 1)
	go func() {
		f, err := os.OpenFile("/dev/mapper/"+name, os.O_WRONLY|unix.O_DIRECT, 0)
		if err != nil {
			wdone <- err
			return
		}
		defer f.Close()
		_, err = f.WriteAt(alignedBuf(t, 4096), 0)
		wdone <- err
	}()
	time.Sleep(200 * time.Millisecond)

	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), suspenderEnv+"="+name)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(out)
	for lines.Scan() && lines.Text() != "suspending" {
	}
	// Kill the parent once its helper waits in the kernel's suspend.
	var helper int
	deadline := time.Now().Add(7 * time.Second)
	for helper == 0 && time.Now().Before(deadline) {
		for _, pid := range suspendHelperPids(t) {
			stack, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stack", pid))
			if strings.Contains(string(stack), "dm_wait_for_completion") || strings.Contains(string(stack), "__dm_suspend") {
				helper = pid
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	if helper == 0 {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("no suspend helper waiting in the kernel's suspend of %s (helpers: %v)", name, suspendHelperPids(t))
	}
	if info, err := c.Info(name); err != nil || info.Suspended {
		t.Fatalf("before the kill: %s suspended=%v (%v): the write should still hold the suspend", name, info.Suspended, err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	t.Logf("killed the suspending process; its helper %d waits in the suspend", helper)

	if err := <-wdone; err != nil {
		t.Fatalf("the held write: %v", err)
	}
	// The helper finishes the suspend, then exits (its parent is gone).
	deadline = time.Now().Add(20 * time.Second)
	for {
		info, err := c.Info(name)
		if err != nil {
			t.Fatal(err)
		}
		_, statErr := os.Stat(fmt.Sprintf("/proc/%d", helper))
		if info.Suspended && statErr != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("20 s after the write ended: %s suspended=%v, helper still there: %v", name, info.Suspended, statErr == nil)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := c.Resume(name); err != nil {
		t.Fatalf("resuming %s: %v", name, err)
	}
	// The mirror still suspends: its recovery slots were given back.
	done := make(chan error, 1)
	go func() {
		_, err := c.Suspend(name, 0)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("suspending %s again: %v", name, err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("the suspend of %s after the kill has not returned in 20 s: the mirror's recovery slots are lost", name)
	}
	if _, err := c.Resume(name); err != nil {
		t.Fatal(err)
	}
}
