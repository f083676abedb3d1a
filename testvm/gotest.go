package testvm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Disk is one virtio disk of a guest test run.
type Disk struct {
	Size int64  // bytes of a fresh sparse image (when Path is "")
	Path string // an existing raw image file to attach instead
	// BlockSize is the disk's logical and physical block size in bytes
	// (4096: a "4Kn" disk); 0 is 512.
	BlockSize int
}

// Options configure RunTestsInGuest.
type Options struct {
	Disks []Disk // attached in order: /dev/vda, /dev/vdb, ... (GuestDisks)
	Run   string // -test.run regexp; default "^TestGuest"
	// FixedRun keeps Run even when DMCONVERT_VM_RUN is set (a caller
	// that already chose its VMs by it).
	FixedRun bool
	Timeout  time.Duration     // for the whole boot; default DefaultTimeout
	MemMiB   int               // default DefaultMemMiB
	SMP      int               // default DefaultSMP
	Env      map[string]string // extra environment of the guest test binary
	Files    map[string]string // guest name -> host path, copied into the share (see GuestFile)
	Bench    string            // -test.bench regexp (with -test.benchmem); default $DMCONVERT_VM_BENCH
}

// CreateDisk creates a sparse raw image file of size bytes.
func CreateDisk(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("testvm: disk image: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fmt.Errorf("testvm: disk image %s: %w", path, err)
	}
	return f.Close()
}

// RunTestsInGuest reruns the calling package's tests inside the VM. It
// skips unless VMRequested(). Otherwise it builds the package's test
// binary statically (CGO_ENABLED=0 go test -c, in the current directory,
// which go test sets to the package directory), boots the guest with
// opts.Disks, runs the binary with -test.v -test.run opts.Run there and
// mirrors each top-level guest test as a host subtest of the same name:
// a guest failure fails it, and so does a guest skip (a guest test must
// not skip where it is meant to run). It fails if no guest test ran, if
// the guest could not be prepared or booted, or if the binary exited
// non-zero without a failing test (a panic, a timeout). It logs the guest
// kernel and the counts, and writes a Report into $DMCONVERT_VM_REPORT_DIR.
func RunTestsInGuest(t *testing.T, opts Options) {
	t.Helper()
	if !VMRequested() {
		t.Skip("real-kernel tests not requested (set DMCONVERT_VM=1, as make test does)")
	}
	if InGuest() {
		t.Skip("already inside the test VM")
	}
	if r := os.Getenv(EnvRun); r != "" && !opts.FixedRun {
		opts.Run = r
	}
	if opts.Run == "" {
		opts.Run = "^TestGuest"
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.Bench == "" {
		opts.Bench = os.Getenv(EnvBench)
	}
	ctx, cancel := context.WithTimeout(context.Background(), opts.Timeout+5*time.Minute)
	defer cancel()

	img, err := Prepare(ctx)
	if err != nil {
		t.Fatalf("preparing the guest image: %v", err)
	}
	pkg, err := goOutput(ctx, ".", "list", "-f", "{{.ImportPath}}", ".")
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	pkg = strings.TrimSpace(pkg)

	work, err := os.MkdirTemp("", "testvm-"+filepath.Base(pkg)+"-")
	if err != nil {
		t.Fatal(err)
	}
	keep := os.Getenv(EnvKeep) == "1"
	defer func() {
		if keep || t.Failed() {
			t.Logf("work directory kept: %s (share/, disk images, console.log)", work)
			return
		}
		os.RemoveAll(work)
	}()
	share := filepath.Join(work, "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}

	bin := filepath.Base(pkg) + ".test"
	start := time.Now()
	if out, err := goCombined(ctx, ".", "test", "-c", "-o", filepath.Join(share, bin)); err != nil {
		t.Fatalf("CGO_ENABLED=0 go test -c %s: %v\n%s", pkg, err, out)
	}
	buildTime := time.Since(start)
	files := filepath.Join(share, "files")
	for name, host := range opts.Files {
		dst := filepath.Join(files, name)
		if !strings.HasPrefix(dst, files+string(filepath.Separator)) {
			t.Fatalf("Options.Files: bad guest name %q", name)
		}
		if err := copyFile(host, dst); err != nil {
			t.Fatalf("Options.Files[%q]: %v", name, err)
		}
	}
	// the package's testdata, so relative paths work as on the host
	if st, err := os.Stat("testdata"); err == nil && st.IsDir() {
		if err := copyTree("testdata", filepath.Join(share, "testdata")); err != nil {
			t.Fatalf("copying testdata: %v", err)
		}
	}
	var disks []string
	blockSizes := make([]int, len(opts.Disks))
	for i, d := range opts.Disks {
		blockSizes[i] = d.BlockSize
		if d.Path != "" {
			disks = append(disks, d.Path)
			continue
		}
		p := filepath.Join(work, fmt.Sprintf("disk%d.img", i))
		if err := CreateDisk(p, d.Size); err != nil {
			t.Fatal(err)
		}
		disks = append(disks, p)
	}

	guestTimeout := opts.Timeout - 30*time.Second
	if guestTimeout < opts.Timeout*9/10 {
		guestTimeout = opts.Timeout * 9 / 10
	}
	// Executing from 9p costs seconds (every page fault is a round trip
	// to the host): the binary and the files run from a tmpfs copy.
	args := []string{guestRunDir + "/" + bin, "-test.v=test2json", "-test.count=1",
		"-test.run", opts.Run, "-test.timeout", guestTimeout.String()}
	if opts.Bench != "" {
		args = append(args, "-test.bench", opts.Bench, "-test.benchmem")
	}
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = shellQuote(a)
	}
	script := "set -o pipefail\n"
	if os.Getenv(EnvVMUdev) == "1" {
		script += UdevPrelude
	}
	script += "mkdir -p " + GuestFilesDir + "\n" +
		"if [ -d files ]; then cp -a files/. " + GuestFilesDir + "/; fi\n" +
		"cp " + shellQuote(bin) + " " + guestRunDir + "/\n" +
		strings.Join(quoted, " ") + " 2>&1 | tee .testvm/test.out\n"

	console, err := os.Create(filepath.Join(work, "console.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer console.Close()
	started := time.Now()
	vm, err := Start(ctx, Config{
		Image: img, Disks: disks, BlockSizes: blockSizes, Share: share, Script: script, Env: opts.Env,
		Timeout: opts.Timeout, MemMiB: opts.MemMiB, SMP: opts.SMP, Console: console,
	})
	if err != nil {
		t.Fatalf("booting the guest: %v", err)
	}
	res, werr := vm.Wait()

	// The framed test output: from the share, or (if the guest died
	// before writing it) from the console.
	raw, rerr := os.ReadFile(filepath.Join(share, ".testvm", "test.out"))
	if rerr != nil || len(raw) == 0 {
		raw = res.Console
	}
	events, cerr := test2json(ctx, pkg, raw)
	if cerr != nil {
		t.Errorf("decoding the guest test output: %v", cerr)
	}
	rep := Report{Package: pkg, Test: t.Name(), Kernel: res.GuestKernel,
		KernelPackage: img.KernelPackage + " " + img.KernelPackageVersion,
		BootSeconds:   res.Boot.Seconds(), TotalSeconds: res.Elapsed.Seconds(), CPUSeconds: res.CPU.Seconds(),
		Started: float64(started.UnixNano()) / 1e9}
	results, pkgOutput := summarize(events)
	rep.count(results)
	mirror(t, results)

	t.Logf("guest kernel %s (%s): %d guest tests ran: %d passed, %d failed, %d skipped; %d benchmarks; build %.1fs, boot %.1fs, VM %.1fs, QEMU CPU %.1fs",
		rep.Kernel, rep.KernelPackage, rep.Ran, rep.Passed, rep.Failed, rep.Skipped, rep.Benchmarks,
		buildTime.Seconds(), rep.BootSeconds, rep.TotalSeconds, rep.CPUSeconds)
	switch {
	case werr != nil:
		t.Errorf("guest run failed: %v", werr)
	case res.GuestKernel != img.KernelVersion:
		t.Errorf("guest reported kernel %q, image has %q", res.GuestKernel, img.KernelVersion)
	case res.ExitCode != 0 && rep.Failed == 0:
		t.Errorf("guest test binary exited %d without a failing test (panic, timeout or crash); package output:\n%s", res.ExitCode, pkgOutput)
	}
	if rep.Ran == 0 && rep.Benchmarks == 0 {
		t.Errorf("no guest test ran (-test.run %q matched nothing inside the VM)", opts.Run)
	}
	if dir := os.Getenv(EnvReportDir); dir != "" {
		if err := rep.write(dir); err != nil {
			t.Error(err)
		}
	}
	if t.Failed() {
		var bad []string
		for _, r := range results {
			if r.Action != "pass" || len(r.Skips) > 0 {
				bad = append(bad, r.Name)
			}
		}
		if len(bad) > 0 {
			t.Logf("guest tests that did not pass: %s (their output is under their own names below)", strings.Join(bad, ", "))
		}
		t.Logf("%s", res.Report())
	}
}

// testEvent is one line of go tool test2json output.
type testEvent struct {
	Action  string
	Test    string
	Output  string
	Elapsed float64
}

// test2json converts the framed -test.v=test2json output into events.
func test2json(ctx context.Context, pkg string, raw []byte) ([]testEvent, error) {
	cmd := exec.CommandContext(ctx, "go", "tool", "test2json", "-p", pkg)
	cmd.Stdin = bytes.NewReader(raw)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go tool test2json: %w: %s", err, stderr.String())
	}
	var evs []testEvent
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e testEvent
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			return evs, fmt.Errorf("test2json line %q: %w", sc.Text(), err)
		}
		evs = append(evs, e)
	}
	return evs, sc.Err()
}

// guestResult is the outcome of one top-level guest test or benchmark.
type guestResult struct {
	Name    string
	Action  string // "pass", "fail", "skip", or "" (no result: the binary died)
	Elapsed float64
	Output  string   // the test's output, subtests included
	Skips   []string // subtests that skipped
}

var resultLine = regexp.MustCompile(`^--- (?:PASS|FAIL|SKIP): (\S+) \(([0-9.]+)s\)`)

// summarize groups test2json events by top-level test (in the order they
// started) and returns them with the package-level output.
func summarize(evs []testEvent) (results []*guestResult, pkgOutput string) {
	byName := map[string]*guestResult{}
	outs := map[string]*strings.Builder{}
	var pkgOut strings.Builder
	for _, e := range evs {
		if e.Test == "" {
			pkgOut.WriteString(e.Output)
			continue
		}
		top, sub, _ := strings.Cut(e.Test, "/")
		r := byName[top]
		if r == nil {
			r = &guestResult{Name: top}
			byName[top] = r
			outs[top] = &strings.Builder{}
			results = append(results, r)
		}
		switch e.Action {
		case "output":
			outs[top].WriteString(e.Output)
			// test2json leaves Elapsed out for framed input; take it
			// from the "--- PASS: TestX (1.23s)" line
			if m := resultLine.FindStringSubmatch(e.Output); m != nil && m[1] == top {
				r.Elapsed, _ = strconv.ParseFloat(m[2], 64)
			}
		case "pass", "fail", "skip":
			if sub == "" {
				r.Action = e.Action
				if e.Elapsed > 0 {
					r.Elapsed = e.Elapsed
				}
			} else if e.Action == "skip" {
				r.Skips = append(r.Skips, e.Test)
			}
		}
	}
	for _, r := range results {
		r.Output = outs[r.Name].String()
	}
	return results, pkgOut.String()
}

// count adds the results to the report's counters. A test counts as run
// when it reported a result; a pass with skipped subtests counts as a
// skip (it did not run everything it should have).
func (rep *Report) count(results []*guestResult) {
	for _, r := range results {
		if strings.HasPrefix(r.Name, "Benchmark") {
			rep.Benchmarks++
			if r.Action == "fail" {
				rep.Failed++
			}
			continue
		}
		if r.Action != "" {
			rep.Tests = append(rep.Tests, r.Name)
			if rep.Seconds == nil {
				rep.Seconds = map[string]float64{}
			}
			rep.Seconds[r.Name] = r.Elapsed
		}
		switch {
		case r.Action == "pass" && len(r.Skips) == 0:
			rep.Ran++
			rep.Passed++
		case r.Action == "pass", r.Action == "skip":
			rep.Ran++
			rep.Skipped++
		case r.Action == "fail":
			rep.Ran++
			rep.Failed++
		}
	}
}

// mirror turns the guest results into host subtests of the same names.
func mirror(t *testing.T, results []*guestResult) {
	for _, r := range results {
		t.Run(r.Name, func(t *testing.T) {
			if strings.HasPrefix(r.Name, "Benchmark") {
				t.Logf("guest benchmark output:\n%s", r.Output)
				if r.Action == "fail" {
					t.Error("guest benchmark failed")
				}
				return
			}
			switch r.Action {
			case "pass":
				if len(r.Skips) > 0 {
					t.Errorf("guest subtests skipped inside the VM: %s; guest output:\n%s", strings.Join(r.Skips, ", "), r.Output)
					return
				}
				t.Logf("guest: PASS in %.2fs", r.Elapsed)
				if os.Getenv(EnvLog) == "1" {
					t.Logf("guest output:\n%s", r.Output)
				}
			case "fail":
				t.Errorf("guest: FAIL in %.2fs; guest output:\n%s", r.Elapsed, r.Output)
			case "skip":
				t.Errorf("guest: SKIP inside the VM (a guest test must run there); guest output:\n%s", r.Output)
			default:
				t.Errorf("guest: no result (the guest binary died or timed out in this test); guest output:\n%s", r.Output)
			}
		})
	}
}

// BuildStatic builds a main package (e.g. "./cmd/dmconvert", relative to
// the module root) with CGO_ENABLED=0 into a temporary directory and
// returns the binary's host path, for Options.Files.
func BuildStatic(t testing.TB, pkg string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	gomod, err := goOutput(ctx, ".", "env", "GOMOD")
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	gomod = strings.TrimSpace(gomod)
	if gomod == "" || gomod == os.DevNull {
		t.Fatalf("BuildStatic %s: not inside a Go module", pkg)
	}
	out := filepath.Join(t.TempDir(), filepath.Base(pkg))
	if o, err := goCombined(ctx, filepath.Dir(gomod), "build", "-o", out, pkg); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build %s: %v\n%s", pkg, err, o)
	}
	return out
}

func goCmd(ctx context.Context, dir string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	return cmd
}

func goOutput(ctx context.Context, dir string, args ...string) (string, error) {
	var stderr bytes.Buffer
	cmd := goCmd(ctx, dir, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%w: %s", err, stderr.String())
	}
	return string(out), nil
}

func goCombined(ctx context.Context, dir string, args ...string) (string, error) {
	out, err := goCmd(ctx, dir, args...).CombinedOutput()
	return string(out), err
}

// copyTree copies a directory tree of regular files.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		return copyFile(p, filepath.Join(dst, rel))
	})
}

// copyFile copies a host file into the share, keeping its permission
// bits (a copy, not a link: the guest may write to it).
func copyFile(src, dst string) error {
	st, err := os.Stat(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, st.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// EnvVMUdev (DMCONVERT_VM_UDEV=1 on the host) runs every guest test of
// RunTestsInGuest with udev, as on a Debian system: udevd started with
// Debian's rules and coldplugged, DM_DISABLE_UDEV unset, and LVM's udev
// settings on (LVM_SYSTEM_DIR). An exploration mode, not part of make
// test: a few tests check the udev-less guest itself (the testvm
// package's environment checks, say) and fail under it.
const EnvVMUdev = "DMCONVERT_VM_UDEV"

// UdevPrelude is the guest script's start under EnvVMUdev; tests that
// want udev run it with bash (and then unset DM_DISABLE_UDEV and set
// LVM_SYSTEM_DIR=UdevLVMDir in their own environment). lvm.conf gets
// Debian's defaults for udev: udev_sync, udev_rules, the device list
// from udev, and event activation (lvm2's 69-lvm.rules then runs pvscan
// and vgchange -aay from udev as PVs appear: the guest has no systemd).
const UdevPrelude = `unset DM_DISABLE_UDEV
mkdir -p ` + UdevLVMDir + `
sed -e 's/udev_sync = 0/udev_sync = 1/' -e 's/udev_rules = 0/udev_rules = 1/' \
	-e 's/obtain_device_list_from_udev = 0/obtain_device_list_from_udev = 1/' \
	-e 's/event_activation = 0/event_activation = 1/' \
	/etc/lvm/lvm.conf > ` + UdevLVMDir + `/lvm.conf
export LVM_SYSTEM_DIR=` + UdevLVMDir + `
/usr/lib/systemd/systemd-udevd --daemon --resolve-names=never || exit 125
udevadm trigger --action=add --subsystem-match=block
udevadm settle --timeout=120
echo "[testvm] udevd running"
`

// UdevLVMDir is the LVM_SYSTEM_DIR of UdevPrelude's lvm.conf.
const UdevLVMDir = "/run/lvm-udev"
