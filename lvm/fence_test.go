package lvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fenceClient answers lvmconfig with a temporary locking_dir and vgs with
// the report recorded in the guest for VG "fvg" (after editing it when
// vgsEdit is set). Only the lock protocol is under test here; the real
// interaction with lvm is TestGuestFence.
func fenceClient(t *testing.T, priority string, vgsEdit func(string) string) (*Client, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "lock")
	vgs, err := os.ReadFile(filepath.Join("testdata", "replay", "fence-lock", "002-lvm.stdout"))
	if err != nil {
		t.Fatal(err)
	}
	out := string(vgs)
	if vgsEdit != nil {
		out = vgsEdit(out)
	}
	c := &Client{}
	c.exec = func(_ context.Context, argv, _ []string) ([]byte, []byte, int, error) {
		switch argv[1] {
		case "lvmconfig":
			return []byte(fmt.Sprintf("locking_dir=%q\nprioritise_write_locks=%s\n", dir, priority)), nil, 0, nil
		case "vgs":
			if !strings.Contains(strings.Join(argv, " "), "--nolocking") {
				t.Errorf("fence check without --nolocking: %q", argv)
			}
			return []byte(out), nil, 0, nil
		}
		t.Fatalf("unexpected command %q", argv)
		return nil, nil, 0, nil
	}
	return c, dir
}

// lvmLock takes a lock file the way lvm2's lock_file() does (an
// independent implementation, to check that we interoperate): with write
// priority, pass through <file>:aux exclusively first.
func lvmLock(path string, how int, priority bool) (*os.File, error) {
	if priority {
		aux, err := lvmFlock(path+":aux", unix.LOCK_EX)
		if err != nil {
			return nil, err
		}
		defer func() { os.Remove(path + ":aux"); aux.Close() }()
	}
	return lvmFlock(path, how)
}

func lvmFlock(path string, how int) (*os.File, error) {
	for {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_RDWR, 0o777)
		if err != nil {
			return nil, err
		}
		if err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB); err != nil {
			f.Close()
			return nil, err
		}
		if same, _ := sameFile(f, path); same {
			return f, nil
		}
		f.Close()
	}
}

// lvmUnlock releases like lvm2's _release_lock.
func lvmUnlock(f *os.File, path string) {
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
		if same, _ := sameFile(f, path); same {
			os.Remove(path)
		}
	}
	f.Close()
}

func TestFenceExcludesLVM(t *testing.T) {
	c, dir := fenceClient(t, "1", nil)
	fe, err := c.LockVG(bg, "fvg", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "V_fvg")
	if fe.Path() != path || fe.VG() != "fvg" || !fe.Held() {
		t.Errorf("fence %s %s %v", fe.Path(), fe.VG(), fe.Held())
	}
	if _, err := os.Stat(path + ":aux"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf(":aux left behind: %v", err)
	}
	for _, how := range []int{unix.LOCK_SH, unix.LOCK_EX} {
		if f, err := lvmLock(path, how, true); !errors.Is(err, unix.EWOULDBLOCK) {
			t.Errorf("lvm lock %d while fenced: %v", how, err)
			if f != nil {
				f.Close()
			}
		}
	}
	hs := LockHolders(path)
	if len(hs) != 1 || hs[0].PID != os.Getpid() || !hs[0].Write || hs[0].Command == "" {
		t.Errorf("holders %+v", hs)
	}
	if err := fe.Release(); err != nil {
		t.Fatal(err)
	}
	if fe.Held() {
		t.Error("still held after Release")
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file not removed on Release (lvm removes it): %v", err)
	}
	f, err := lvmLock(path, unix.LOCK_SH, true)
	if err != nil {
		t.Fatalf("lvm lock after Release: %v", err)
	}
	lvmUnlock(f, path)
	if err := fe.Release(); err != nil {
		t.Errorf("second Release: %v", err)
	}
}

func TestFenceWaitsForLVM(t *testing.T) {
	c, dir := fenceClient(t, "1", nil)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "V_fvg")
	held, err := lvmLock(path, unix.LOCK_SH, true)
	if err != nil {
		t.Fatal(err)
	}
	// Busy until the deadline: a timeout naming the holder.
	start := time.Now()
	_, err = c.LockVG(bg, "fvg", 150*time.Millisecond)
	var le *LockError
	if !errors.Is(err, ErrLockTimeout) || !errors.Is(err, unix.EWOULDBLOCK) || !errors.As(err, &le) {
		t.Fatalf("LockVG on a held VG: %v", err)
	}
	if d := time.Since(start); d < 150*time.Millisecond || d > 2*time.Second {
		t.Errorf("gave up after %v", d)
	}
	if len(le.Holders) != 1 || le.Holders[0].PID != os.Getpid() || le.Holders[0].Write || le.Path != path {
		t.Errorf("LockError %+v", le)
	}
	t.Log(err)
	// Timeout 0: a single attempt.
	if _, err := c.LockVG(bg, "fvg", 0); !errors.Is(err, ErrLockTimeout) {
		t.Errorf("LockVG(timeout 0): %v", err)
	}

	// Waiting: while LockVG waits it holds :aux, so a new lvm reader
	// queues behind it (write priority); when the holder releases the
	// lvm way (unlock, unlink), LockVG gets the lock on the new file.
	type res struct {
		fe  *Fence
		err error
	}
	done := make(chan res, 1)
	go func() {
		fe, err := c.LockVG(bg, "fvg", 10*time.Second)
		done <- res{fe, err}
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if len(LockHolders(path+":aux")) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("LockVG never took :aux")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if f, err := lvmLock(path, unix.LOCK_SH, true); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Errorf("a new lvm reader got in ahead of the waiting fence: %v", err)
		if f != nil {
			lvmUnlock(f, path)
		}
	}
	select {
	case r := <-done:
		t.Fatalf("LockVG returned while the VG was held: %v", r.err)
	case <-time.After(100 * time.Millisecond):
	}
	lvmUnlock(held, path)
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.fe.Release()
	if same, err := sameFile(r.fe.f, path); err != nil || !same {
		t.Errorf("the fence holds a lock on a file that is not %s: %v", path, err)
	}
	if _, err := lvmLock(path, unix.LOCK_SH, false); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Errorf("lvm reader while fenced: %v", err)
	}
}

func TestFenceNoWritePriority(t *testing.T) {
	c, dir := fenceClient(t, "0", nil)
	fe, err := c.LockVG(bg, "fvg", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer fe.Release()
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 || ents[0].Name() != "V_fvg" {
		t.Errorf("locking dir holds %v", ents)
	}
}

func TestFenceContextCancel(t *testing.T) {
	c, dir := fenceClient(t, "1", nil)
	os.MkdirAll(dir, 0o755)
	path := filepath.Join(dir, "V_fvg")
	held, err := lvmLock(path, unix.LOCK_EX, true)
	if err != nil {
		t.Fatal(err)
	}
	defer lvmUnlock(held, path)
	ctx, cancel := context.WithTimeout(bg, 100*time.Millisecond)
	defer cancel()
	_, err = c.LockVG(ctx, "fvg", -1)
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrLockTimeout) {
		t.Errorf("LockVG with an expiring context: %v", err)
	}
	if _, err := os.Stat(path + ":aux"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf(":aux left behind: %v", err)
	}
}

func TestFenceRefusesVGs(t *testing.T) {
	for _, tc := range []struct {
		name, vg string
		edit     func(string) string
		want     error
	}{
		{"no such VG", "novg", nil, ErrNoSuchVG},
		// lvmlockd VGs cannot be made here (no lvmlockd); the recorded
		// report is edited to carry the fields such a VG has.
		{"sanlock", "fvg", func(s string) string {
			return strings.Replace(s, `"vg_lock_type":""`, `"vg_lock_type":"sanlock"`, 1)
		}, ErrUnsupportedVG},
		{"shared", "fvg", func(s string) string {
			return strings.Replace(s, `"vg_shared":"0"`, `"vg_shared":"1"`, 1)
		}, ErrUnsupportedVG},
		{"clustered", "fvg", func(s string) string {
			return strings.Replace(s, `"vg_clustered":"0"`, `"vg_clustered":"1"`, 1)
		}, ErrUnsupportedVG},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, dir := fenceClient(t, "1", tc.edit)
			_, err := c.LockVG(bg, tc.vg, time.Second)
			if !errors.Is(err, tc.want) {
				t.Errorf("LockVG: %v, want %v", err, tc.want)
			}
			t.Log(err)
			// Refused: the lock is released (and its file removed).
			if _, serr := os.Stat(filepath.Join(dir, "V_"+tc.vg)); !errors.Is(serr, os.ErrNotExist) {
				t.Errorf("lock file left: %v", serr)
			}
		})
	}
	c, _ := fenceClient(t, "1", nil)
	for _, bad := range []string{"", "../x", "a/b", "-x", ".", "..", strings.Repeat("v", 128), "v g"} {
		if _, err := c.LockVG(bg, bad, 0); err == nil {
			t.Errorf("LockVG(%q) accepted", bad)
		}
	}
	for _, ok := range []string{"vg0", "a+b_c.d-e", strings.Repeat("v", 127)} {
		if !validVGName(ok) {
			t.Errorf("validVGName(%q) = false", ok)
		}
	}
}

// Fenced calls run lvm with --nolocking (recorded in the guest while the
// fence was held), and stop working after Release.
func TestReplayFencedCalls(t *testing.T) {
	r := loadReplay(t, "fence-discover")
	c := r.client()
	f, err := os.CreateTemp(t.TempDir(), "lock")
	if err != nil {
		t.Fatal(err)
	}
	fe := &Fence{c: c, vg: "fvg", path: f.Name(), f: f}
	p, err := fe.Discover(bg, "/dev/vdc")
	if err != nil {
		t.Fatal(err)
	}
	if lv := p.VG.LV("lv"); lv == nil || !lv.Active {
		t.Errorf("fenced Discover: lv %+v", lv)
	}
	if err := fe.ActivateLVs(bg, []string{"off"}, nil); err != nil {
		t.Fatal(err)
	}
	// The guest test's lvchange --refresh, which waited for Release.
	if _, err := c.Run(bg, "lvchange", "--refresh", "fvg/lv"); err != nil {
		t.Fatal(err)
	}
	r.done()
	if err := fe.Release(); err != nil {
		t.Fatal(err)
	}
	if _, err := fe.Discover(bg, "/dev/vdc"); !errors.Is(err, ErrFenceReleased) {
		t.Errorf("Discover after Release: %v", err)
	}
	if err := fe.Activate(bg, nil); !errors.Is(err, ErrFenceReleased) {
		t.Errorf("Activate after Release: %v", err)
	}

	// The fenced activation of TestGuestActivate.
	r = loadReplay(t, "activate")
	c = r.client()
	r.pos = 2 // its Activate and ActivateLVs are in TestReplayActivate
	r.next("lvm", "lvmconfig (LockVG, not replayed)")
	r.next("lvm", "vgs (LockVG, not replayed)")
	f2, _ := os.CreateTemp(t.TempDir(), "lock")
	fe = &Fence{c: c, vg: "avg", path: f2.Name(), f: f2}
	if err := fe.Activate(bg, []string{"/dev/mapper/acopy", "/dev/vdb"}); err != nil {
		t.Fatal(err)
	}
	r.done()
	fe.Release()
}

func TestParseLocksLine(t *testing.T) {
	id := "00:16:52"
	for _, tc := range []struct {
		line string
		ok   bool
		want LockHolder
	}{
		{"1: FLOCK  ADVISORY  WRITE 261 00:16:52 0 EOF", true, LockHolder{PID: 261, Write: true}},
		{"2: FLOCK  ADVISORY  READ 300 00:16:52 0 EOF", true, LockHolder{PID: 300}},
		{"1: -> FLOCK  ADVISORY  WRITE 400 00:16:52 0 EOF", false, LockHolder{}},
		{"3: POSIX  ADVISORY  WRITE 500 00:16:52 0 EOF", false, LockHolder{}},
		{"4: FLOCK  ADVISORY  WRITE 600 00:16:53 0 EOF", false, LockHolder{}},
		{"garbage", false, LockHolder{}},
	} {
		h, ok := parseLocksLine(tc.line, id)
		if ok != tc.ok || h != tc.want {
			t.Errorf("%q: %+v %v", tc.line, h, ok)
		}
	}
}
