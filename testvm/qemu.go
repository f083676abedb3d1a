package testvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Defaults of Config and Options.
const (
	DefaultTimeout = 10 * time.Minute
	DefaultMemMiB  = 2048
	// DefaultSMP is one guest CPU. With two, under TCG's multi-threaded
	// mode on a loaded host, a virtio-blk write now and then never
	// completed (the guest's /sys/block/vdX/inflight stayed at 1; every
	// dm device above it, and the dmconvert suspending a mirror over
	// it, blocked for good): seen in about 1 of 10 decrypt runs with
	// three VMs on two host cores. Benchmarks ask for two.
	DefaultSMP = 1
)

// Errors of Wait and Run (test with errors.Is).
var (
	// ErrTimeout: the guest did not power off within Config.Timeout; QEMU
	// was killed.
	ErrTimeout = errors.New("guest timed out")
	// ErrNoExitStatus: QEMU ended but the guest never reported its
	// script's exit status (kernel panic, /init failure, share problem).
	ErrNoExitStatus = errors.New("guest reported no exit status")
)

// Config describes one boot of the guest.
type Config struct {
	Image *Image   // nil: Prepare(ctx)
	Disks []string // host raw image files, attached in order: /dev/vda, /dev/vdb, ...
	// BlockSizes[i], when set and not 0, is Disks[i]'s logical and
	// physical block size in bytes (512 otherwise).
	BlockSizes []int
	Share      string            // host directory shared read-write at /share; "": a temporary one, removed by Wait
	Script     string            // bash script run in the guest as root, cwd = /share
	Env        map[string]string // extra environment of the script
	Timeout    time.Duration     // host-side limit for the whole boot; default DefaultTimeout
	MemMiB     int               // default DefaultMemMiB
	SMP        int               // default DefaultSMP
	Console    io.Writer         // optional live copy of the serial console
	Append     string            // extra kernel command line words

	// DiskCache is QEMU's cache= mode of the disks; default "none"
	// (O_DIRECT on the host; the guest sees a volatile write cache and
	// issues flushes as on a real disk).
	DiskCache string
	// Shell leaves an interactive bash on the console after the script
	// (stdin of the calling process is wired to the serial port). For
	// debugging by hand only.
	Shell bool
}

// Result is what one boot produced.
type Result struct {
	ExitCode    int           // the script's exit status; -1 if it never reported one
	Console     []byte        // the serial console (kernel messages at loglevel <= 4, /init, the script's output)
	Dmesg       []byte        // the guest's kernel log, saved by /init after the script
	DmesgPath   string        // where that log is on the host (in the share; gone if the share is removed)
	Elapsed     time.Duration // QEMU start to QEMU exit
	Boot        time.Duration // QEMU start to the guest being ready to run the script
	GuestKernel string        // uname -r, as the guest reported it
	Killed      bool          // ended by VM.Kill (a power cut)
	CPU         time.Duration // host CPU time (user+sys) the QEMU process used
	CommandLine string        // the reproducible QEMU command line
}

// reportDmesgLines is how much of the guest's kernel log Report prints:
// its tail, where a failure's traces are; the boot messages before them
// would push the test's own failure out of a log reader's view.
const reportDmesgLines = 60

// Report is the text to print when a boot failed: the QEMU command line
// and the tail of the guest's kernel log, with where the whole log is (or
// the console's tail when the guest never saved its log).
func (r Result) Report() string {
	var b strings.Builder
	fmt.Fprintf(&b, "qemu command line (reproducible while the share and disk files exist):\n  %s\n", r.CommandLine)
	if len(r.Dmesg) > 0 {
		fmt.Fprintf(&b, "guest dmesg, the last %d lines (all of it: %s):\n%s", reportDmesgLines, r.DmesgPath, indent(tail(r.Dmesg, reportDmesgLines)))
	} else {
		fmt.Fprintf(&b, "no guest dmesg; console tail:\n%s", indent(tail(r.Console, 60)))
	}
	return b.String()
}

func indent(b []byte) string {
	s := strings.TrimRight(string(b), "\n")
	return "  " + strings.ReplaceAll(s, "\n", "\n  ") + "\n"
}

func tail(b []byte, lines int) []byte {
	b = bytes.TrimRight(b, "\n")
	i := len(b)
	for n := 0; n < lines && i > 0; n++ {
		i = bytes.LastIndexByte(b[:i], '\n')
		if i < 0 {
			return b
		}
	}
	return b[i+1:]
}

// VM is a running guest.
type VM struct {
	cfg      Config
	args     []string
	cmd      *exec.Cmd
	start    time.Time
	ownShare bool
	claimed  string // the share it holds in sharesInUse
	stderr   bytes.Buffer

	mu      sync.Mutex
	console bytes.Buffer
	changed chan struct{} // closed and replaced on every console write
	ready   time.Duration
	kernel  string
	killed  bool
	cpu     time.Duration // host CPU of the QEMU process, once it exited
	timeout bool
	ctxErr  error

	exited   chan struct{} // closed when QEMU exited and the console is drained
	waitErr  error
	waitOnce sync.Once
	result   Result
	resErr   error
	stop     chan struct{}
}

// Run boots the guest, runs cfg.Script and waits for the power-off.
func Run(ctx context.Context, cfg Config) (Result, error) {
	vm, err := Start(ctx, cfg)
	if err != nil {
		return Result{ExitCode: -1}, err
	}
	return vm.Wait()
}

// Start boots the guest and returns while it runs.
func Start(ctx context.Context, cfg Config) (*VM, error) {
	if cfg.Image == nil {
		img, err := Prepare(ctx)
		if err != nil {
			return nil, err
		}
		cfg.Image = img
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.MemMiB <= 0 {
		cfg.MemMiB = DefaultMemMiB
	}
	if cfg.SMP <= 0 {
		cfg.SMP = DefaultSMP
	}
	if cfg.DiskCache == "" {
		cfg.DiskCache = "none"
	}
	vm := &VM{changed: make(chan struct{}), exited: make(chan struct{}), stop: make(chan struct{})}
	if cfg.Share == "" {
		dir, err := os.MkdirTemp("", "testvm-share-")
		if err != nil {
			return nil, fmt.Errorf("testvm: share: %w", err)
		}
		cfg.Share, vm.ownShare = dir, true
	}
	share, err := filepath.Abs(cfg.Share)
	if err != nil {
		return nil, fmt.Errorf("testvm: share %s: %w", cfg.Share, err)
	}
	cfg.Share = share
	// The guest reads its script from the share: two VMs running on one
	// share would run each other's scripts.
	if err := claimShare(share); err != nil {
		vm.cleanup()
		return nil, err
	}
	vm.claimed = share
	cfg.Disks = append([]string(nil), cfg.Disks...)
	for i, d := range cfg.Disks {
		abs, err := filepath.Abs(d)
		if err != nil {
			vm.cleanup()
			return nil, fmt.Errorf("testvm: disk %s: %w", d, err)
		}
		if st, err := os.Stat(abs); err != nil {
			vm.cleanup()
			return nil, fmt.Errorf("testvm: disk %s: %w", d, err)
		} else if !st.Mode().IsRegular() {
			vm.cleanup()
			return nil, fmt.Errorf("testvm: disk %s: not a regular file", d)
		}
		cfg.Disks[i] = abs
	}
	vm.cfg = cfg
	if err := vm.writeControl(); err != nil {
		vm.cleanup()
		return nil, err
	}
	if cfg.DiskCache == "none" && len(cfg.Disks) > 0 && !directIOWorks(cfg.Disks[0]) {
		// cache=none needs O_DIRECT on the host file system (tmpfs has it
		// only since Linux 6.6); writeback still honours guest flushes.
		cfg.DiskCache = "writeback"
		vm.cfg.DiskCache = "writeback"
	}
	vm.args = qemuArgs(cfg)

	cmd := exec.Command(vm.args[0], vm.args[1:]...)
	cmd.Stderr = &vm.stderr
	// QEMU dies with the test process (a go test timeout, a ^C)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if cfg.Shell {
		cmd.Stdin = os.Stdin
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		vm.cleanup()
		return nil, fmt.Errorf("testvm: %w", err)
	}
	vm.cmd = cmd
	vm.start = time.Now()
	// Pdeathsig fires when the *thread* that started QEMU exits, so start
	// it from a locked thread that lives until QEMU has ended.
	started := make(chan error)
	go func() {
		runtime.LockOSThread()
		err := cmd.Start()
		started <- err
		if err == nil {
			<-vm.exited
		}
	}()
	if err := <-started; err != nil {
		vm.cleanup()
		return nil, fmt.Errorf("testvm: starting %s: %w", vm.args[0], err)
	}
	copied := make(chan struct{})
	go func() {
		vm.copyConsole(out)
		close(copied)
	}()
	go func() {
		<-copied
		vm.waitErr = cmd.Wait()
		vm.mu.Lock()
		if ps := cmd.ProcessState; ps != nil {
			vm.cpu = ps.UserTime() + ps.SystemTime()
		}
		close(vm.exited)
		vm.notifyLocked()
		vm.mu.Unlock()
	}()
	go func() {
		timer := time.NewTimer(cfg.Timeout)
		defer timer.Stop()
		select {
		case <-vm.exited:
		case <-vm.stop:
		case <-timer.C:
			vm.mu.Lock()
			vm.timeout = true
			vm.mu.Unlock()
			cmd.Process.Kill()
		case <-ctx.Done():
			vm.mu.Lock()
			vm.ctxErr = ctx.Err()
			vm.mu.Unlock()
			cmd.Process.Kill()
		}
	}()
	return vm, nil
}

// writeControl writes /share/.testvm/run.sh (environment, cd, script).
func (vm *VM) writeControl() error {
	ctl := filepath.Join(vm.cfg.Share, ".testvm")
	if err := os.RemoveAll(ctl); err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	if err := os.MkdirAll(ctl, 0o755); err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	env := map[string]string{
		EnvGuest:      "1",
		EnvGuestDisks: strings.Join(guestDiskNames(len(vm.cfg.Disks)), ","),
		EnvGuestShare: GuestShare,
	}
	for k, v := range vm.cfg.Env {
		env[k] = v
	}
	keys := make([]string, 0, len(env))
	for k := range env {
		if !envName.MatchString(k) {
			return fmt.Errorf("testvm: invalid environment variable name %q", k)
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString("# written by the testvm host side\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "export %s=%s\n", k, shellQuote(env[k]))
	}
	fmt.Fprintf(&b, "cd %s || exit 125\nexec bash %s/.testvm/script.sh\n", GuestShare, GuestShare)
	if err := os.WriteFile(filepath.Join(ctl, "run.sh"), []byte(b.String()), 0o755); err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	if err := os.WriteFile(filepath.Join(ctl, "script.sh"), []byte(vm.cfg.Script), 0o755); err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	if vm.cfg.Shell {
		if err := os.WriteFile(filepath.Join(ctl, "shell"), nil, 0o644); err != nil {
			return fmt.Errorf("testvm: %w", err)
		}
	}
	return nil
}

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// directIOWorks reports whether a disk image can be opened with O_DIRECT.
func directIOWorks(path string) bool {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return !errors.Is(err, syscall.EINVAL)
	}
	f.Close()
	return true
}

// qemuOpt escapes a value inside a QEMU option list (commas double).
func qemuOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func qemuArgs(cfg Config) []string {
	qemu := os.Getenv("DMCONVERT_QEMU")
	if qemu == "" {
		qemu = "qemu-system-x86_64"
	}
	appendLine := "console=ttyS0 quiet loglevel=4 panic=-1 oops=panic"
	if cfg.Append != "" {
		appendLine += " " + cfg.Append
	}
	args := []string{qemu,
		// KVM on these machines runs a stock kernel ~100x slower: TCG only.
		"-accel", "tcg,thread=multi",
		"-M", "q35", "-cpu", "max,-erms,-fsrm",
		"-smp", strconv.Itoa(cfg.SMP), "-m", strconv.Itoa(cfg.MemMiB),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
	}
	if cfg.Shell {
		args = append(args, "-serial", "mon:stdio")
	} else {
		args = append(args, "-serial", "stdio", "-monitor", "none")
	}
	args = append(args,
		"-kernel", cfg.Image.Kernel, "-initrd", cfg.Image.Initrd,
		"-append", appendLine,
		"-device", "virtio-rng-pci",
		"-virtfs", "local,path="+qemuOpt(cfg.Share)+",mount_tag=testvm,security_model=none,id=testvm",
	)
	// Each disk a virtio-blk-pci device of its own -device option (what
	// if=virtio makes, but QEMU creates -device devices before if=virtio
	// ones: mixing both forms would reorder /dev/vdX).
	for i, d := range cfg.Disks {
		id := fmt.Sprintf("disk%d", i)
		dev := "virtio-blk-pci,drive=" + id
		if i < len(cfg.BlockSizes) && cfg.BlockSizes[i] != 0 {
			bs := cfg.BlockSizes[i]
			dev += fmt.Sprintf(",logical_block_size=%d,physical_block_size=%d", bs, bs)
		}
		args = append(args, "-drive", "file="+qemuOpt(d)+",format=raw,if=none,id="+id+",cache="+cfg.DiskCache, "-device", dev)
	}
	return args
}

// CommandLine returns the QEMU command line, shell-quoted, so a failed
// boot can be repeated by hand (while its share and disks exist).
func (vm *VM) CommandLine() string {
	q := make([]string, len(vm.args))
	for i, a := range vm.args {
		if a != "" && strings.Trim(a, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=.,/:+") == "" {
			q[i] = a
		} else {
			q[i] = shellQuote(a)
		}
	}
	return strings.Join(q, " ")
}

// Share returns the host directory shared with the guest.
func (vm *VM) Share() string { return vm.cfg.Share }

func (vm *VM) copyConsole(r io.Reader) {
	buf := make([]byte, 32<<10)
	var line []byte
	for {
		n, err := r.Read(buf)
		if n > 0 {
			data := bytes.ReplaceAll(buf[:n], []byte("\r"), nil)
			vm.mu.Lock()
			vm.console.Write(data)
			line = append(line, data...)
			for {
				i := bytes.IndexByte(line, '\n')
				if i < 0 {
					break
				}
				vm.scanLine(string(line[:i]))
				line = line[i+1:]
			}
			vm.notifyLocked()
			vm.mu.Unlock()
			if vm.cfg.Console != nil {
				vm.cfg.Console.Write(data)
			}
		}
		if err != nil {
			return
		}
	}
}

// scanLine notes the guest's ready marker. Called with vm.mu held.
func (vm *VM) scanLine(l string) {
	if i := strings.Index(l, "TESTVM-READY "); i >= 0 && vm.ready == 0 {
		vm.ready = time.Since(vm.start)
		for _, f := range strings.Fields(l[i:]) {
			if v, ok := strings.CutPrefix(f, "kernel="); ok {
				vm.kernel = v
			}
		}
	}
}

func (vm *VM) notifyLocked() {
	close(vm.changed)
	vm.changed = make(chan struct{})
}

// WaitForConsole returns once the console (from the start of the boot)
// contains substr. It fails if the VM ends first or ctx is done. Use it to
// act at a precise point of the guest's work, e.g. a power cut right after
// the guest printed a marker.
func (vm *VM) WaitForConsole(ctx context.Context, substr string) error {
	for {
		vm.mu.Lock()
		found := bytes.Contains(vm.console.Bytes(), []byte(substr))
		ch := vm.changed
		exited := vm.exited
		vm.mu.Unlock()
		if found {
			return nil
		}
		select {
		case <-exited:
			vm.mu.Lock()
			found = bytes.Contains(vm.console.Bytes(), []byte(substr))
			vm.mu.Unlock()
			if found {
				return nil
			}
			return fmt.Errorf("testvm: the VM ended without printing %q", substr)
		case <-ctx.Done():
			return fmt.Errorf("testvm: waiting for %q on the console: %w", substr, ctx.Err())
		case <-ch:
		}
	}
}

// Console returns a copy of the console output so far.
func (vm *VM) Console() []byte {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return bytes.Clone(vm.console.Bytes())
}

// Kill ends QEMU with SIGKILL: a power cut. Everything QEMU already
// passed to the host file (with cache=none: every completed write) stays;
// Wait then returns a Result with Killed set and no error.
func (vm *VM) Kill() error {
	vm.mu.Lock()
	select {
	case <-vm.exited:
		vm.mu.Unlock()
		return errors.New("testvm: kill: the VM has already ended")
	default:
	}
	vm.killed = true
	vm.mu.Unlock()
	if err := vm.cmd.Process.Kill(); err != nil {
		return fmt.Errorf("testvm: kill qemu: %w", err)
	}
	return nil
}

// Wait waits for the guest to power off (or be killed) and returns what
// it did. A non-zero exit status of the script is not an error; the
// error is for host-side failures (QEMU failing, timeout, no status).
func (vm *VM) Wait() (Result, error) {
	vm.waitOnce.Do(func() {
		<-vm.exited
		close(vm.stop)
		vm.result, vm.resErr = vm.collect()
		vm.cleanup()
	})
	return vm.result, vm.resErr
}

func (vm *VM) collect() (Result, error) {
	vm.mu.Lock()
	r := Result{
		ExitCode:    -1,
		Console:     bytes.Clone(vm.console.Bytes()),
		Elapsed:     time.Since(vm.start),
		Boot:        vm.ready,
		GuestKernel: vm.kernel,
		Killed:      vm.killed,
		CPU:         vm.cpu,
		CommandLine: vm.CommandLine(),
	}
	timedOut, ctxErr := vm.timeout, vm.ctxErr
	vm.mu.Unlock()
	ctl := filepath.Join(vm.cfg.Share, ".testvm")
	r.DmesgPath = filepath.Join(ctl, "dmesg")
	r.Dmesg, _ = os.ReadFile(r.DmesgPath)
	if r.Killed {
		return r, nil
	}
	if timedOut {
		return r, fmt.Errorf("testvm: no power-off within %v, qemu killed: %w", vm.cfg.Timeout, ErrTimeout)
	}
	if ctxErr != nil {
		return r, fmt.Errorf("testvm: qemu killed: %w", ctxErr)
	}
	if vm.waitErr != nil {
		return r, fmt.Errorf("testvm: qemu: %w: %s", vm.waitErr, strings.TrimSpace(vm.stderr.String()))
	}
	if data, err := os.ReadFile(filepath.Join(ctl, "exit")); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil {
			r.ExitCode = n
			return r, nil
		}
	}
	// the share may have failed: fall back to the console marker
	if m := exitMarker.FindAllSubmatch(r.Console, -1); len(m) > 0 {
		n, _ := strconv.Atoi(string(m[len(m)-1][1]))
		r.ExitCode = n
		return r, nil
	}
	return r, fmt.Errorf("testvm: %w (kernel panic or /init failure? see the console)", ErrNoExitStatus)
}

var exitMarker = regexp.MustCompile(`(?m)^TESTVM-EXIT=(\d+)`)

// sharesInUse are the share directories of the VMs of this process that
// have not ended.
var (
	sharesMu    sync.Mutex
	sharesInUse = map[string]bool{}
)

func claimShare(dir string) error {
	sharesMu.Lock()
	defer sharesMu.Unlock()
	if sharesInUse[dir] {
		return fmt.Errorf("testvm: share %s is in use by another VM that has not ended (give each running VM its own share)", dir)
	}
	sharesInUse[dir] = true
	return nil
}

func (vm *VM) cleanup() {
	if vm.claimed != "" {
		sharesMu.Lock()
		delete(sharesInUse, vm.claimed)
		sharesMu.Unlock()
		vm.claimed = ""
	}
	if vm.ownShare {
		os.RemoveAll(vm.cfg.Share)
	}
}
