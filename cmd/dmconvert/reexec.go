package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// memfdMarker is set in the environment of the process re-executed from a
// memfd, so it never re-executes again.
const memfdMarker = "DMCONVERT_MEMFD"

// reexecFromMemfd makes the process run from an in-memory copy of its
// executable (docs/design.md section 4, invariant 6): the binary may live
// on a file system on the very stack the run suspends, and a page fault
// on its text would then wait for a device only this process can resume.
// It copies /proc/self/exe into a sealed memfd and execs
// /proc/self/fd/N with the same arguments and environment plus
// DMCONVERT_MEMFD=1. It returns only on error, or at once when the
// process already runs from a memfd.
func reexecFromMemfd() error {
	if os.Getenv(memfdMarker) != "" {
		return nil
	}
	if exe, err := os.Readlink("/proc/self/exe"); err == nil && strings.HasPrefix(exe, "/memfd:") {
		return nil
	}
	src, err := os.Open("/proc/self/exe")
	if err != nil {
		return fmt.Errorf("opening the executable: %w", err)
	}
	defer src.Close()
	fd, err := unix.MemfdCreate("dmconvert", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return fmt.Errorf("memfd_create: %w", err)
	}
	mem := os.NewFile(uintptr(fd), "memfd:dmconvert")
	defer mem.Close()
	if _, err := io.Copy(mem, src); err != nil {
		return fmt.Errorf("copying the executable into memory: %w", err)
	}
	// Nobody may change the copy any more.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SEAL|unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_WRITE); err != nil {
		return fmt.Errorf("sealing the in-memory executable: %w", err)
	}
	env := append(os.Environ(), memfdMarker+"=1")
	// The fd is close-on-exec: execve opens the path before closing it.
	err = unix.Exec(fmt.Sprintf("/proc/self/fd/%d", fd), os.Args, env)
	runtime.KeepAlive(mem)
	return fmt.Errorf("exec from memfd: %w", err)
}
