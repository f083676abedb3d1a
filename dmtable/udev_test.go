//go:build linux

package dmtable

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestCookieSemaphore exercises the cookie protocol on the host's SysV
// semaphores (no device-mapper needed): one outstanding uevent, completed
// by "udev", lets the waiter through; an uncompleted one times out.
func TestCookieSemaphore(t *testing.T) {
	ck, err := newCookie()
	if err != nil {
		t.Skipf("no SysV semaphores here: %v", err)
	}
	defer ck.destroy()
	if ck.value()>>16 != cookieMagic || ck.value()&0xffff == 0 {
		t.Fatalf("cookie %#x", ck.value())
	}
	if ev := ck.eventNr(udevPrimarySource); ev>>16 != udevPrimarySource || ev&0xffff != uint32(ck.base) {
		t.Fatalf("event_nr %#x", ev)
	}
	// Nobody completes it: the wait times out.
	t0 := time.Now()
	done, err := ck.wait(100 * time.Millisecond)
	if err != nil || done {
		t.Fatalf("wait without completion: %v %v", done, err)
	}
	if d := time.Since(t0); d < 90*time.Millisecond {
		t.Fatalf("timed out after %v", d)
	}
	// "udev" completes it from another goroutine, through the value it
	// would find in DM_COOKIE (flags in the upper half).
	go func() {
		time.Sleep(50 * time.Millisecond)
		if err := udevComplete(ck.eventNr(udevPrimarySource)); err != nil {
			t.Error(err)
		}
	}()
	done, err = ck.wait(10 * time.Second)
	if err != nil || !done {
		t.Fatalf("wait with completion: %v %v", done, err)
	}
	// A cookie with no base carries flags only: nothing to complete.
	if err := udevComplete(udevPrimarySource << 16); err != nil {
		t.Fatal(err)
	}
}

// fakeUdev plays udevd with the stock dm rules' effect: on a uevent of a
// dm device it creates or removes /dev/mapper/<name>, then completes the
// cookie with the reference tool, `dmsetup udevcomplete $DM_COOKIE`.
type fakeUdev struct {
	t       *testing.T
	fd      int
	devDir  string
	mu      sync.Mutex
	names   map[string]string // "major:minor" -> name
	cookies []string
	ignore  bool
	stop    atomic.Bool
	done    chan struct{}
}

func startFakeUdev(t *testing.T, devDir string) *fakeUdev {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		t.Fatalf("uevent socket: %v", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		t.Fatalf("uevent bind: %v", err)
	}
	// Closing a socket does not wake a blocked recvfrom: poll a stop flag
	// every 100 ms instead.
	tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatalf("uevent socket timeout: %v", err)
	}
	u := &fakeUdev{t: t, fd: fd, devDir: devDir, names: map[string]string{}, done: make(chan struct{})}
	go u.loop()
	t.Cleanup(func() {
		u.stop.Store(true)
		<-u.done
		unix.Close(fd)
	})
	return u
}

func (u *fakeUdev) loop() {
	defer close(u.done)
	buf := make([]byte, 64<<10)
	for !u.stop.Load() {
		n, _, err := unix.Recvfrom(u.fd, buf, 0)
		if err == unix.EAGAIN || err == unix.EINTR {
			continue
		}
		if err != nil {
			u.t.Errorf("fake udev: recvfrom: %v", err)
			return
		}
		if n == 0 {
			continue
		}
		env := map[string]string{}
		for _, kv := range bytes.Split(buf[:n], []byte{0}) {
			if k, v, ok := strings.Cut(string(kv), "="); ok {
				env[k] = v
			}
		}
		if env["SUBSYSTEM"] != "block" || !strings.HasPrefix(env["DEVNAME"], "dm-") {
			continue
		}
		u.handle(env)
	}
}

func (u *fakeUdev) handle(env map[string]string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.ignore {
		return
	}
	devno := env["MAJOR"] + ":" + env["MINOR"]
	switch env["ACTION"] {
	case "add", "change":
		nameB, err := os.ReadFile(filepath.Join("/sys/block", env["DEVNAME"], "dm", "name"))
		if err != nil {
			// A late event of a device already removed (other tests'
			// devices come and go too): real udev skips it as well. Our
			// own events carry a cookie and must find their device.
			if env["DM_COOKIE"] != "" {
				u.t.Errorf("fake udev: event with cookie %s: %v", env["DM_COOKIE"], err)
			}
			break
		}
		name := strings.TrimSpace(string(nameB))
		if old, ok := u.names[devno]; ok && old != name {
			os.Remove(filepath.Join(u.devDir, old))
		}
		maj, _ := strconv.Atoi(env["MAJOR"])
		min, _ := strconv.Atoi(env["MINOR"])
		p := filepath.Join(u.devDir, name)
		os.Remove(p)
		if err := unix.Mknod(p, unix.S_IFBLK|0o600, int(unix.Mkdev(uint32(maj), uint32(min)))); err != nil {
			u.t.Errorf("fake udev: mknod %s: %v", p, err)
		}
		u.names[devno] = name
	case "remove":
		if name, ok := u.names[devno]; ok {
			os.Remove(filepath.Join(u.devDir, name))
			delete(u.names, devno)
		}
	}
	if c := env["DM_COOKIE"]; c != "" {
		u.cookies = append(u.cookies, env["ACTION"]+" "+c)
		// Like 95-dm-notify.rules. dmsetup must believe udev runs: no
		// DM_DISABLE_UDEV, and /run/udev/control exists.
		cmd := exec.Command("dmsetup", "udevcomplete", c)
		cmd.Env = envWithout(os.Environ(), "DM_DISABLE_UDEV")
		if out, err := cmd.CombinedOutput(); err != nil {
			u.t.Errorf("dmsetup udevcomplete %s: %v\n%s", c, err, out)
		}
	}
}

func envWithout(env []string, key string) []string {
	var out []string
	for _, kv := range env {
		if !strings.HasPrefix(kv, key+"=") {
			out = append(out, kv)
		}
	}
	return out
}

func TestGuestUdevCookie(t *testing.T) {
	_, a, _ := guestSetup(t)
	// Make this guest look like it runs udev, for dmsetup's udevcomplete.
	if err := os.MkdirAll("/run/udev", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile("/run/udev/control", nil, 0o600); err != nil {
		t.Fatal(err)
	}
	defer os.Remove("/run/udev/control")

	c, err := Open(Options{Udev: UdevOn, UdevTimeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() }) // after the device cleanups, which run first
	if !c.UsesUdev() {
		t.Fatal("UdevOn client does not use udev")
	}
	u := startFakeUdev(t, "/dev/mapper")
	name := "dmt-udev"
	lin := mustTable(t, fmt.Sprintf("0 2048 linear %s 0", a))

	in, err := c.Create(name, "")
	if err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, name)
	if _, err := c.Load(name, lin); err != nil {
		t.Fatal(err)
	}
	// Resume returns only after udev has made the node: check at once, no
	// polling.
	if _, err := c.Resume(name); err != nil {
		t.Fatal(err)
	}
	checkNode(t, c, name, in.Dev)
	if err := c.Rename(name, name+"-b"); err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c, name+"-b")
	checkNoNode(t, c, name)
	checkNode(t, c, name+"-b", in.Dev)
	if err := c.SetUUID(name+"-b", "DMT-UDEV"); err != nil {
		t.Fatal(err)
	}
	if err := c.Remove(name + "-b"); err != nil {
		t.Fatal(err)
	}
	checkNoNode(t, c, name+"-b")

	u.mu.Lock()
	cookies := append([]string(nil), u.cookies...)
	u.mu.Unlock()
	t.Logf("uevents with cookies: %q", cookies)
	if len(cookies) != 4 {
		t.Errorf("saw %d cookies (resume, rename, set-uuid, remove), want 4: %q", len(cookies), cookies)
	}
	for _, ck := range cookies {
		_, v, _ := strings.Cut(ck, " ")
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || n>>16 != udevPrimarySource || n&0xffff == 0 {
			t.Errorf("DM_COOKIE %q: want flags %#x and a base", v, udevPrimarySource)
		}
	}
	// No semaphore is left behind (dmsetup lists live cookies).
	cmd := exec.Command("dmsetup", "udevcookies")
	cmd.Env = envWithout(os.Environ(), "DM_DISABLE_UDEV")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("dmsetup udevcookies: %v\n%s", err, out)
	}
	if lines := strings.Split(strings.TrimSpace(string(out)), "\n"); len(lines) > 1 {
		t.Errorf("cookies left behind:\n%s", out)
	}

	// udev does not answer: the Client gives up after UdevTimeout and
	// makes the node itself.
	c2, err := Open(Options{Udev: UdevOn, UdevTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c2.Close() })
	u.mu.Lock()
	u.ignore = true
	u.mu.Unlock()
	in, err = c2.Create(name, "")
	if err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, c2, name)
	if _, err := c2.Load(name, lin); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if _, err := c2.Resume(name); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d < 250*time.Millisecond {
		t.Errorf("resume without udev's answer returned after %v, before the timeout", d)
	}
	checkNode(t, c2, name, in.Dev)
	if err := c2.Remove(name); err != nil {
		t.Fatal(err)
	}
	checkNoNode(t, c2, name)
}
