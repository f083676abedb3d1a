package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/dmconvert/dmconvert/convert"
)

// app is everything a command touches outside its flags: the standard
// streams, where journals live, how the engine is made, and the process
// hooks (re-exec, signals). Tests build one around pipes and fakes and
// call the run functions in-process.
type app struct {
	stdin     *os.File
	stdout    io.Writer
	stderr    io.Writer
	stdoutTTY bool // draw a progress bar
	stdinTTY  bool // prompts go to the terminal

	// journalDir is where journals are found (convert.DefaultJournalDir).
	journalDir string
	// crypttab is the default --crypttab file.
	crypttab string
	// statusLockTimeout bounds status's wait for a journal held by a run.
	statusLockTimeout time.Duration
	// liveDir is where a run publishes its position for status
	// (defaultLiveDir; empty: not published).
	liveDir string

	newEngine func() (*convert.Engine, func() error, error)
	// reexec moves the process onto a memfd copy of its executable before
	// a run (nil: never, in tests).
	reexec func() error
	// notify and stopNotify wrap signal.Notify and signal.Stop.
	notify     func(c chan<- os.Signal, sig ...os.Signal)
	stopNotify func(c chan<- os.Signal)

	// Global output flags.
	json  bool
	quiet bool
	// hint is printed after the error, if any (what to do next).
	hint string
}

func newApp() *app {
	return &app{
		stdin:             os.Stdin,
		stdout:            os.Stdout,
		stderr:            os.Stderr,
		stdoutTTY:         term.IsTerminal(int(os.Stdout.Fd())),
		stdinTTY:          term.IsTerminal(int(os.Stdin.Fd())),
		journalDir:        convert.DefaultJournalDir,
		crypttab:          "/etc/crypttab",
		statusLockTimeout: 300 * time.Millisecond,
		liveDir:           defaultLiveDir,
		newEngine:         convert.NewSystem,
		reexec:            reexecFromMemfd,
		notify:            signal.Notify,
		stopNotify:        signal.Stop,
	}
}

// run executes the command line and returns the process exit code.
func run(args []string) int { return newApp().main(args) }

// main runs one command line: errors are printed once, here.
func (a *app) main(args []string) int {
	ran := false
	a.hint = ""
	root := a.rootCommand(&ran)
	root.SetArgs(args)
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	err := root.ExecuteContext(context.Background())
	if err == nil {
		return exitOK
	}
	code := exitCode(err)
	if !ran {
		// cobra's own errors: unknown command or flag, argument count.
		code = exitRefused
	}
	fmt.Fprintf(a.stderr, "dmconvert: %v\n", err)
	if a.hint != "" {
		fmt.Fprint(a.stderr, a.hint)
	}
	return code
}

const rootLong = `dmconvert changes how a live block device is encrypted while it is in use.

'dmconvert encrypt DEVICE' turns an LVM physical volume whose logical volumes
are active (and mounted) into LVM on LUKS, in place and online: the logical
volumes are moved onto a device-mapper device stacked over the disk, the data
is copied chunk by chunk into a dm-crypt mapping through the kernel's mirror
target, and a journal makes every step resumable after a crash or a signal.

Passphrases and key files are read as cryptsetup reads them (--key-file,
--keyfile-offset, --keyfile-size; "-" is standard input).

`

func (a *app) rootCommand(ran *bool) *cobra.Command {
	root := &cobra.Command{
		Use:           "dmconvert",
		Short:         "change how a live block device is encrypted, while it is in use",
		Long:          rootLong + exitCodesText(),
		SilenceUsage:  true,
		SilenceErrors: true,
		// Subcommands only.
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	root.CompletionOptions.DisableDefaultCmd = true
	pf := root.PersistentFlags()
	pf.BoolVar(&a.json, "json", false, "print progress and the result as JSON lines on standard output")
	pf.BoolVar(&a.quiet, "quiet", false, "print nothing but errors")
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usagef("%v (see '%s --help')", err, cmd.CommandPath())
	})
	mark := func(f func(cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
		return func(cmd *cobra.Command, args []string) error {
			*ran = true
			return f(cmd, args)
		}
	}
	root.AddCommand(a.encryptCommand(mark), a.decryptCommand(mark), a.rekeyCommand(mark), a.resumeCommand(mark), a.abortCommand(mark), a.statusCommand(mark))
	return root
}

// maxArgs is cobra.MaximumNArgs with a usage error.
func maxArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) > n {
			return usagef("%s takes at most %d argument(s), got %d (see '%s --help')", cmd.CommandPath(), n, len(args), cmd.CommandPath())
		}
		return nil
	}
}

func exactArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usagef("%s takes %d argument(s), got %d (see '%s --help')", cmd.CommandPath(), n, len(args), cmd.CommandPath())
		}
		return nil
	}
}

// stopper turns SIGINT, SIGTERM and SIGHUP into a stop request the
// engine polls between steps (RunOptions.Stop). Later signals only say
// that the current step is finishing: the process never dies mid-step by
// them. SIGHUP is there because its default ends the process wherever it
// is: a dropped ssh session could leave a mapping suspended, and with it
// every file system above it, the root's too.
type stopper struct {
	a     *app
	c     chan os.Signal
	done  chan struct{}
	stop  chan struct{}
	count int
	note  func(string)
}

func (a *app) startStopper(note func(string)) *stopper {
	s := &stopper{a: a, c: make(chan os.Signal, 4), done: make(chan struct{}), stop: make(chan struct{}), note: note}
	if a.notify != nil {
		a.notify(s.c, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	}
	go s.loop()
	return s
}

func (s *stopper) loop() {
	defer close(s.done)
	for sig := range s.c {
		s.count++
		if s.count == 1 {
			close(s.stop)
			s.note(fmt.Sprintf("%v: stopping at the next safe point; the conversion stays resumable (dmconvert resume, or dmconvert abort)", sig))
			continue
		}
		s.note(fmt.Sprintf("%v: still finishing the current step; dmconvert stops right after it", sig))
	}
}

// requested is RunOptions.Stop.
func (s *stopper) requested() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

func (s *stopper) close() {
	if s.a.stopNotify != nil {
		s.a.stopNotify(s.c)
	}
	close(s.c)
	<-s.done
}
