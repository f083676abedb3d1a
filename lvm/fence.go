package lvm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The fence is LVM's own per-VG file lock, taken the way lvm2 takes it
// (lvm2 2.03.16 lib/locking/file_locking.c and lib/misc/lvm-flock.c):
//
//   - the lock file is <global/locking_dir>/V_<vgname> (the VG name as
//     is: lvm allows only [A-Za-z0-9+_.-] in it); the global lock is
//     <locking_dir>/P_global;
//   - open(O_CREAT|O_APPEND|O_RDWR), flock(), then stat(path) and
//     fstat(fd) must name the same inode, else another process unlinked
//     the file in between and the whole thing starts over;
//   - with global/prioritise_write_locks=1 (the default) an exclusive
//     taker first holds <file>:aux exclusively, so that new shared takers
//     (which pass through :aux too) queue behind it;
//   - on release: LOCK_UN, then if LOCK_EX|LOCK_NB succeeds and the path
//     still names our inode, unlink it; close.
//
// Which lvm commands it stops (lvm2 2.03.16 vg_read): every command that
// reads the VG takes V_<vg>, shared for reports and `vgchange --refresh`,
// exclusive for changes and for activation (READ_FOR_ACTIVATE, which
// covers lvchange --refresh and vgchange/lvchange -a, autoactivation by
// pvscan included). `vgchange --refresh` reloads every LV under a SHARED
// lock, so the fence must be exclusive. P_global is not taken: it guards
// orphan PVs and VG names (pvcreate, vgcreate, vgextend, vgrename...),
// and every one of those that touches this VG also takes V_<vg>; holding
// P_global would stop every `pvs`/`vgs`/`lvs` on the machine for the
// whole run.
//
// A fence lives in this process: the kernel drops the flock when the
// process exits, so a crash releases it (resume takes it again).

// validVGName mirrors lvm's validate_name(): 1-127 characters from
// [A-Za-z0-9+_.-], not starting with '-', not "." or "..".
func validVGName(name string) bool {
	if name == "" || len(name) > 127 || name[0] == '-' || name == "." || name == ".." {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '+' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}

// LockPath returns the lock file lvm uses for a VG, from the Client's
// view of global/locking_dir.
func (c *Client) LockPath(ctx context.Context, vg string) (string, error) {
	if !validVGName(vg) {
		return "", fmt.Errorf("invalid volume group name %q", vg)
	}
	dir, err := c.ConfigValue(ctx, "global/locking_dir")
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, "V_"+vg), nil
}

// Fence holds LVM's exclusive lock on one VG. While it is held every lvm
// command that reads or changes the VG waits (or fails at once with
// global/wait_for_locks=0): no lvchange/vgchange --refresh, activation,
// lvextend, dmeventd repair, nor pvs/vgs/lvs of it. lvm commands that do
// not read VGs (pvscan --cache, lvmdevices, lvmconfig) still run.
//
// Our own lvm calls follow the same rule: Client.Discover, ShrinkPV,
// Activate and Refresh would wait for the fence forever (until their
// context ends). Use Fence.Discover and Fence.Activate instead: they run
// lvm with --nolocking, which is sound because this process holds the
// lock they would have taken. Never run lvm while a device it scans is
// suspended: it would block reading it.
type Fence struct {
	c    *Client
	vg   string
	path string

	mu sync.Mutex
	f  *os.File // nil once released
}

// LockVG takes the fence on vg. It waits up to timeout for other lvm
// commands to finish (timeout 0: one attempt; negative: only ctx limits
// the wait). On timeout the *LockError matches ErrLockTimeout and
// unix.EWOULDBLOCK and names the processes holding the lock.
//
// Once the lock is held, LockVG checks the VG (without taking its lock
// again): a VG that does not exist fails with ErrNoSuchVG, one that uses
// lvmlockd or clvmd with ErrUnsupportedVG, and the lock is released.
// The check is race-free: changing a VG's lock type needs the lock.
func (c *Client) LockVG(ctx context.Context, vg string, timeout time.Duration) (*Fence, error) {
	if !validVGName(vg) {
		return nil, fmt.Errorf("locking volume group: invalid name %q", vg)
	}
	cfg, err := c.ReadLockConfig(ctx)
	if err != nil {
		return nil, fmt.Errorf("locking volume group %s: %w", vg, err)
	}
	return c.LockVGWith(ctx, vg, timeout, cfg)
}

// LockConfig is what LockVG reads of lvm's configuration.
type LockConfig struct {
	Dir             string // global/locking_dir
	PrioritiseWrite bool   // global/prioritise_write_locks
}

// ReadLockConfig reads LockVG's settings (one lvmconfig). A caller can
// read them ahead (while other work runs) and pass them to LockVGWith.
func (c *Client) ReadLockConfig(ctx context.Context) (LockConfig, error) {
	cfg, err := c.configValues(ctx, "global/locking_dir", "global/prioritise_write_locks")
	if err != nil {
		return LockConfig{}, err
	}
	return LockConfig{Dir: cfg["global/locking_dir"], PrioritiseWrite: cfg["global/prioritise_write_locks"] != "0"}, nil
}

// LockVGWith is LockVG with its settings read before (ReadLockConfig).
func (c *Client) LockVGWith(ctx context.Context, vg string, timeout time.Duration, cfg LockConfig) (*Fence, error) {
	if !validVGName(vg) {
		return nil, fmt.Errorf("locking volume group: invalid name %q", vg)
	}
	dir := cfg.Dir
	if dir == "" {
		return nil, fmt.Errorf("locking volume group %s: lvm has no global/locking_dir", vg)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil { // lvm creates it the same way (dm_create_dir)
		return nil, fmt.Errorf("locking volume group %s: %w", vg, err)
	}
	path := filepath.Join(dir, "V_"+vg)
	var deadline time.Time
	if timeout >= 0 {
		deadline = time.Now().Add(timeout)
	}
	f, err := lockFile(ctx, path, cfg.PrioritiseWrite, deadline)
	if err != nil {
		le := &LockError{VG: vg, Path: path, Err: err}
		if errors.Is(err, unix.EWOULDBLOCK) {
			le.Holders = LockHolders(path)
		}
		return nil, le
	}
	fe := &Fence{c: c, vg: vg, path: path, f: f}
	if err := fe.checkVG(ctx); err != nil {
		if rerr := fe.Release(); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return nil, err
	}
	return fe, nil
}

// checkVG makes sure the fenced VG exists and is protected by this lock.
func (fe *Fence) checkVG(ctx context.Context) error {
	args := append(append([]string{}, reportFlags...), "-o", "vg_name,vg_uuid,vg_lock_type,vg_shared,vg_clustered")
	out, err := fe.c.run(ctx, call{cmd: "vgs", args: args, lock: lockNone, devices: true})
	if err != nil {
		return fmt.Errorf("checking volume group %s: %w", fe.vg, err)
	}
	rep, err := parseReport(out)
	if err != nil {
		return fmt.Errorf("checking volume group %s: %w", fe.vg, err)
	}
	for _, r := range rep.rows("vg") {
		if r["vg_name"] != fe.vg {
			continue
		}
		vg := &VG{Name: fe.vg, LockType: r["vg_lock_type"], Shared: r["vg_shared"] == "1", Clustered: r["vg_clustered"] == "1"}
		if err := vg.Check(); err != nil {
			return err
		}
		return nil
	}
	return fmt.Errorf("volume group %s: %w", fe.vg, ErrNoSuchVG)
}

// VG is the fenced volume group's name.
func (fe *Fence) VG() string { return fe.vg }

// Path is the lock file.
func (fe *Fence) Path() string { return fe.path }

// Held reports whether the fence is still held.
func (fe *Fence) Held() bool {
	fe.mu.Lock()
	defer fe.mu.Unlock()
	return fe.f != nil
}

// Release drops the lock, the way lvm does. It is idempotent.
func (fe *Fence) Release() error {
	fe.mu.Lock()
	defer fe.mu.Unlock()
	if fe.f == nil {
		return nil
	}
	err := unlockFile(fe.f, fe.path)
	fe.f = nil
	if err != nil {
		return fmt.Errorf("unlocking volume group %s (%s): %w", fe.vg, fe.path, err)
	}
	return nil
}

// held fails once the fence has been released.
func (fe *Fence) held() error {
	fe.mu.Lock()
	defer fe.mu.Unlock()
	if fe.f == nil {
		return fmt.Errorf("volume group %s: %w", fe.vg, ErrFenceReleased)
	}
	return nil
}

// Discover is Client.Discover for a PV of the fenced VG, run with
// --nolocking (the fence is the lock it would take). It still reports
// whether LVs are active, unlike --readonly.
func (fe *Fence) Discover(ctx context.Context, device string) (*PVInfo, error) {
	if err := fe.held(); err != nil {
		return nil, err
	}
	p, err := fe.c.discover(ctx, device, lockNone)
	if err != nil {
		return nil, err
	}
	if p.VG.Name != fe.vg {
		return nil, fmt.Errorf("%s belongs to volume group %s, not to the fenced %s", device, p.VG.Name, fe.vg)
	}
	return p, nil
}

// Activate is Client.Activate for the fenced VG, run with --nolocking.
// resume uses it to bring the LVs back on the intermediate device before
// anything else can reach the VG.
func (fe *Fence) Activate(ctx context.Context, devices []string) error {
	if err := fe.held(); err != nil {
		return err
	}
	return fe.c.activate(ctx, fe.vg, nil, devices, lockNone)
}

// ActivateLVs is Client.ActivateLVs for LVs of the fenced VG, run with
// --nolocking.
func (fe *Fence) ActivateLVs(ctx context.Context, lvs []string, devices []string) error {
	if err := fe.held(); err != nil {
		return err
	}
	return fe.c.activate(ctx, fe.vg, lvs, devices, lockNone)
}

// lockFile takes an exclusive flock on path with lvm's protocol,
// polling until deadline (zero: no deadline) or ctx ends.
func lockFile(ctx context.Context, path string, writePriority bool, deadline time.Time) (*os.File, error) {
	if !writePriority {
		return flockPath(ctx, path, deadline)
	}
	aux, err := flockPath(ctx, path+":aux", deadline)
	if err != nil {
		return nil, err
	}
	f, err := flockPath(ctx, path, deadline)
	// lvm drops :aux as soon as the real lock is held (or not).
	if uerr := undoFlock(aux, path+":aux"); uerr != nil && err == nil {
		unlockFile(f, path)
		return nil, uerr
	}
	return f, err
}

// flockPath opens path and takes LOCK_EX on it, retrying while it is
// busy or was unlinked under us.
func flockPath(ctx context.Context, path string, deadline time.Time) (*os.File, error) {
	wait := 5 * time.Millisecond
	for {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_RDWR, 0o600)
		if err != nil {
			return nil, err
		}
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			if same, serr := sameFile(f, path); serr == nil && same {
				return f, nil
			}
			// Unlinked by its previous holder between our open and our
			// flock: the lock is on a dead inode. Start over.
			f.Close()
			continue
		}
		f.Close()
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return nil, err
		}
		if !deadline.IsZero() && !time.Now().Before(deadline) {
			return nil, unix.EWOULDBLOCK
		}
		d := wait
		if !deadline.IsZero() {
			d = min(d, time.Until(deadline))
		}
		t := time.NewTimer(max(d, 0))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		wait = min(wait*2, 200*time.Millisecond)
	}
}

func sameFile(f *os.File, path string) (bool, error) {
	a, err := f.Stat()
	if err != nil {
		return false, err
	}
	b, err := os.Stat(path)
	if err != nil {
		return false, err
	}
	return os.SameFile(a, b), nil
}

// undoFlock is lvm's _undo_flock: unlink the file if we can hold it
// exclusively and it is still the one at path, then close.
func undoFlock(f *os.File, path string) error {
	if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
		if same, err := sameFile(f, path); err == nil && same {
			os.Remove(path)
		}
	}
	return f.Close()
}

// unlockFile is lvm's _release_lock: LOCK_UN, then undoFlock (which
// unlinks the file unless a waiter took it in between).
func unlockFile(f *os.File, path string) error {
	err := unix.Flock(int(f.Fd()), unix.LOCK_UN|unix.LOCK_NB)
	return errors.Join(err, undoFlock(f, path))
}

// LockHolders lists the processes that hold a flock on path, from
// /proc/locks ("1: FLOCK  ADVISORY  WRITE 261 00:16:52 0 EOF": pid, then
// the file as hex major:minor and decimal inode; waiters are "->" lines).
func LockHolders(path string) []LockHolder {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil
	}
	id := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	f, err := os.Open("/proc/locks")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []LockHolder
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		h, ok := parseLocksLine(sc.Text(), id)
		if ok {
			out = append(out, h)
		}
	}
	for i := range out {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", out[i].PID)); err == nil {
			out[i].Command = strings.TrimSpace(string(b))
		}
	}
	return out
}

func parseLocksLine(line, id string) (LockHolder, bool) {
	fs := strings.Fields(line)
	if len(fs) < 6 || fs[1] == "->" || fs[1] != "FLOCK" || fs[5] != id {
		return LockHolder{}, false
	}
	pid, err := strconv.Atoi(fs[4])
	if err != nil {
		return LockHolder{}, false
	}
	return LockHolder{PID: pid, Write: fs[3] == "WRITE"}, true
}
