// Command testvm prepares and boots the real-kernel test VM by hand.
//
//	testvm prepare                 build (or find) the cached guest image and describe it
//	testvm run [flags] SCRIPT      boot, run a bash script in the guest, exit with its status
//	testvm run [flags] -c 'CMDS'   the same with the script on the command line
//	testvm demo                    boot with a sample live LVM disk and show it
//	testvm report [-module DIR] R  sum up the JSON reports of a make test run in R;
//	                               with -module, also fail if a TestGuest* function
//	                               of that module ran in no VM
//
// Run "testvm run -h" for the flags (disks, share, timeout, shell, keep).
package main

import (
	"context"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

//go:embed demo.sh
var demoScript string

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	code := 0
	switch os.Args[1] {
	case "prepare":
		err = prepare(ctx, os.Args[2:])
	case "run":
		code, err = runCmd(ctx, os.Args[2:])
	case "demo":
		code, err = demo(ctx, os.Args[2:])
	case "report":
		err = report(os.Args[2:])
	case "-h", "-help", "--help", "help":
		usage()
		return
	default:
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "testvm:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func usage() {
	fmt.Fprint(os.Stderr, `usage:
  testvm prepare                build (or find) the cached guest image and describe it
  testvm run [flags] SCRIPT     boot, run a bash script in the guest, exit with its status
  testvm run [flags] -c 'CMDS'  the same with the script given inline
  testvm demo                   boot with a sample live LVM disk (VG, LVs, mounted fs, writer) and show it
  testvm report [-module DIR] R sum up the JSON reports written by RunTestsInGuest into R
`)
}

func logf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

func prepare(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("prepare", flag.ExitOnError)
	fs.Parse(args)
	img, err := testvm.PrepareLog(ctx, logf)
	if err != nil {
		return err
	}
	how := "cached"
	if img.Built {
		how = "built"
	}
	fmt.Printf("guest image %s in %.1fs: %s\n  kernel %s\n  initrd %s\n", how, img.BuildTime.Seconds(), img, img.Kernel, img.Initrd)
	return nil
}

// diskList is a repeatable -disk flag: a size (256M, 1G, 4096) for a
// fresh sparse image, or the path of an existing image file.
type diskList []string

func (d *diskList) String() string     { return strings.Join(*d, ",") }
func (d *diskList) Set(v string) error { *d = append(*d, v); return nil }

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("bad disk size %q", s)
	}
	return n * mult, nil
}

type runFlags struct {
	disks   diskList
	share   string
	timeout time.Duration
	mem     int
	smp     int
	keep    bool
	shell   bool
	quiet   bool
	append  string
	env     diskList
}

func (f *runFlags) register(fs *flag.FlagSet) {
	fs.Var(&f.disks, "disk", "a disk: a size (256M, 1G) for a fresh sparse image, or an existing image file; repeat for /dev/vdb, ...")
	fs.StringVar(&f.share, "share", "", "host directory shared at /share (default: a fresh temporary one)")
	fs.DurationVar(&f.timeout, "timeout", testvm.DefaultTimeout, "kill QEMU after this long")
	fs.IntVar(&f.mem, "mem", testvm.DefaultMemMiB, "guest memory in MiB")
	fs.IntVar(&f.smp, "smp", testvm.DefaultSMP, "guest CPUs")
	fs.BoolVar(&f.keep, "keep", false, "keep the work directory (disks, share, console log) and print the QEMU command line")
	fs.BoolVar(&f.shell, "shell", false, "after the script, leave an interactive bash on the console (Ctrl-A X quits QEMU)")
	fs.BoolVar(&f.quiet, "q", false, "do not copy the console to stdout")
	fs.StringVar(&f.append, "append", "", "extra kernel command line")
	fs.Var(&f.env, "env", "NAME=VALUE for the guest script; repeatable")
}

// boot runs script in the guest with the flags' disks and share and
// returns the guest's exit status.
func (f *runFlags) boot(ctx context.Context, script string) (int, error) {
	img, err := testvm.PrepareLog(ctx, logf)
	if err != nil {
		return 1, err
	}
	work, err := os.MkdirTemp("", "testvm-run-")
	if err != nil {
		return 1, err
	}
	keep := f.keep
	defer func() {
		if keep {
			logf("testvm: kept %s", work)
		} else {
			os.RemoveAll(work)
		}
	}()
	share := f.share
	if share == "" {
		share = filepath.Join(work, "share")
		if err := os.Mkdir(share, 0o755); err != nil {
			return 1, err
		}
	}
	var disks []string
	for i, d := range f.disks {
		if size, err := parseSize(d); err == nil {
			p := filepath.Join(work, fmt.Sprintf("disk%d.img", i))
			if err := testvm.CreateDisk(p, size); err != nil {
				return 1, err
			}
			disks = append(disks, p)
			continue
		}
		if _, err := os.Stat(d); err != nil {
			return 1, fmt.Errorf("-disk %s: neither a size nor an existing file", d)
		}
		disks = append(disks, d)
	}
	env := map[string]string{}
	for _, kv := range f.env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return 1, fmt.Errorf("-env %q: want NAME=VALUE", kv)
		}
		env[k] = v
	}
	console, err := os.Create(filepath.Join(work, "console.log"))
	if err != nil {
		return 1, err
	}
	defer console.Close()
	var out io.Writer = console
	if !f.quiet {
		out = io.MultiWriter(console, os.Stdout)
	}
	logf("testvm: booting %s", img)
	vm, err := testvm.Start(ctx, testvm.Config{
		Image: img, Disks: disks, Share: share, Script: script, Env: env,
		Timeout: f.timeout, MemMiB: f.mem, SMP: f.smp, Console: out, Append: f.append, Shell: f.shell,
	})
	if err != nil {
		return 1, err
	}
	res, err := vm.Wait()
	logf("testvm: guest %s, boot %.2fs, total %.2fs, exit status %d", res.GuestKernel, res.Boot.Seconds(), res.Elapsed.Seconds(), res.ExitCode)
	if err != nil || res.ExitCode != 0 {
		keep = true
		fmt.Fprint(os.Stderr, res.Report())
	} else if f.keep {
		logf("testvm: qemu command line:\n  %s", res.CommandLine)
	}
	if err != nil {
		return 1, err
	}
	return res.ExitCode, nil
}

func runCmd(ctx context.Context, args []string) (int, error) {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	var f runFlags
	f.register(fs)
	inline := fs.String("c", "", "the guest script, inline")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: testvm run [flags] SCRIPT | -c 'CMDS'")
		fs.PrintDefaults()
	}
	fs.Parse(args)
	script := *inline
	switch {
	case script != "" && fs.NArg() == 0:
	case script == "" && fs.NArg() == 1:
		data, err := os.ReadFile(fs.Arg(0))
		if err != nil {
			return 1, err
		}
		script = string(data)
	case script == "" && fs.NArg() == 0 && f.shell:
		script = "true"
	default:
		fs.Usage()
		return 2, nil
	}
	return f.boot(ctx, script)
}

func demo(ctx context.Context, args []string) (int, error) {
	fs := flag.NewFlagSet("demo", flag.ExitOnError)
	var f runFlags
	f.register(fs)
	fs.Parse(args)
	if len(f.disks) == 0 {
		// The disk converted, and a small one for /var/lib/dmconvert,
		// where the journal goes (the guest's root is in memory).
		f.disks = diskList{"1G", "64M"}
	}
	return f.boot(ctx, demoScript)
}

func report(args []string) error {
	fs := flag.NewFlagSet("report", flag.ExitOnError)
	module := fs.String("module", "", "module root: also fail if a TestGuest* function it declares ran in no VM")
	fs.Parse(args)
	if fs.NArg() != 1 {
		return errors.New("usage: testvm report [-module DIR] REPORTDIR")
	}
	reps, err := testvm.ReadReports(fs.Arg(0))
	if err != nil {
		return err
	}
	var tot testvm.Report
	first := 0.0 // the first VM's start: each VM's start is shown from it
	for _, r := range reps {
		if r.Started > 0 && (first == 0 || r.Started < first) {
			first = r.Started
		}
	}
	for _, r := range reps {
		at := ""
		if r.Started > 0 {
			at = fmt.Sprintf("started +%.0fs, ", r.Started-first)
		}
		fmt.Printf("vm: %-45s %-16s ran %3d: %3d passed, %d failed, %d skipped (%sboot %.1fs, VM %.1fs, QEMU CPU %.1fs, %d benchmarks)\n",
			r.Package+"."+r.Test, r.Kernel, r.Ran, r.Passed, r.Failed, r.Skipped, at, r.BootSeconds, r.TotalSeconds, r.CPUSeconds, r.Benchmarks)
		tot.TotalSeconds += r.TotalSeconds
		tot.CPUSeconds += r.CPUSeconds
		tot.Ran += r.Ran
		tot.Passed += r.Passed
		tot.Failed += r.Failed
		tot.Skipped += r.Skipped
		if tot.Kernel == "" {
			tot.Kernel = r.Kernel
		}
	}
	printSlowest(reps, 12)
	fmt.Printf("vm total: %d guest tests ran inside %d VM boots (guest kernel %s): %d passed, %d failed, %d skipped; %.0fs of VMs, %.0fs of QEMU CPU\n",
		tot.Ran, len(reps), tot.Kernel, tot.Passed, tot.Failed, tot.Skipped, tot.TotalSeconds, tot.CPUSeconds)
	var missing []string
	if *module != "" {
		declared, err := testvm.DeclaredGuestTests(*module)
		if err != nil {
			return err
		}
		missing = testvm.MissingGuestTests(declared, reps)
		for _, m := range missing {
			fmt.Printf("vm: guest test %s did not run in any VM (no TestVM, or its Options.Run misses it)\n", m)
		}
	}
	switch {
	case tot.Ran == 0:
		return errors.New("no guest test ran inside the VM")
	case tot.Failed > 0 || tot.Skipped > 0:
		return fmt.Errorf("%d guest tests failed, %d skipped", tot.Failed, tot.Skipped)
	case len(missing) > 0:
		return fmt.Errorf("%d declared guest tests did not run", len(missing))
	}
	return nil
}

// printSlowest prints the n guest tests that took longest (each test's
// own elapsed time in its guest), to show where the suite's time goes.
func printSlowest(reps []testvm.Report, n int) {
	type row struct {
		name string
		sec  float64
	}
	var rows []row
	for _, r := range reps {
		for name, sec := range r.Seconds {
			rows = append(rows, row{r.Package + "." + r.Test + "/" + name, sec})
		}
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].sec > rows[j].sec })
	if len(rows) > n {
		rows = rows[:n]
	}
	for _, r := range rows {
		fmt.Printf("vm: slowest guest tests: %6.1fs %s\n", r.sec, r.name)
	}
}
