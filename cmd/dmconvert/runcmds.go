package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/journal"
	"github.com/dmconvert/dmconvert/luks"
)

type markFunc = func(func(*cobra.Command, []string) error) func(*cobra.Command, []string) error

// continueOptions are the flags of resume and abort.
type continueOptions struct {
	journal      string
	oldKeyFile   string
	hash         string
	device       string
	key          keyOptions
	crypttab     bool
	crypttabFile string
	batch        bool // accepted like encrypt's; nothing is asked
}

// registerOldKey adds the flags that give a plain rekey's old key when no
// live mapping shows it.
func (o *continueOptions) registerOldKey(f *pflag.FlagSet) {
	f.StringVar(&o.oldKeyFile, "old-key-file", "", "plain dm-crypt rekey: the old key file, when no live mapping shows the old key (after a reboot)")
	f.StringVar(&o.hash, "hash", "", "plain dm-crypt rekey of a mapping opened with a passphrase: make the old key from the passphrase (asked, or the first line of standard input) with this hash, as cryptsetup open --type plain --hash does (its default: "+luks.DefaultPlainHash+")")
}

// registerBatch accepts encrypt's confirmation flags, so scripts can pass
// the same flags to every command; resume and abort ask no confirmation.
func (o *continueOptions) registerBatch(f *pflag.FlagSet) {
	f.BoolVarP(&o.batch, "batch-mode", "q", false, "accepted for symmetry with encrypt (nothing is asked)")
	f.BoolVar(&o.batch, "yes", false, "accepted for symmetry with encrypt (nothing is asked)")
}

const findRunHelp = `The run is found from --journal; else from DEVICE (a LUKS header of a run in
progress names its journal in its checkpoint, an LVM label gives the PV UUID
and so ` + convert.DefaultJournalDir + `/<PV UUID>.journal, or a journal there
records DEVICE); with neither, it is the only unfinished journal in
` + convert.DefaultJournalDir + `.`

func (a *app) resumeCommand(mark markFunc) *cobra.Command {
	o := &continueOptions{}
	cmd := &cobra.Command{
		Use:   "resume [DEVICE]",
		Short: "continue an interrupted conversion (or an interrupted abort)",
		Long: `Continue an interrupted conversion from its journal, online. An interrupted
abort is continued as an abort. The passphrase (or key file) is asked again.

` + findRunHelp,
		Args: maxArgs(1),
		RunE: mark(func(cmd *cobra.Command, args []string) error { return a.runResume(cmd.Context(), o, args) }),
	}
	f := cmd.Flags()
	f.StringVar(&o.journal, "journal", "", "journal of the run")
	f.StringVar(&o.device, "device", "", "the disk's path now, if it changed since the run began")
	o.key.register(f)
	o.registerOldKey(f)
	f.BoolVar(&o.crypttab, "crypttab", false, "when the encryption completes, append the crypttab line to /etc/crypttab (or --crypttab-file)")
	f.StringVar(&o.crypttabFile, "crypttab-file", "", "crypttab file to append to (implies --crypttab)")
	o.registerBatch(f)
	return cmd
}

func (a *app) abortCommand(mark markFunc) *cobra.Command {
	o := &continueOptions{}
	cmd := &cobra.Command{
		Use:   "abort [DEVICE]",
		Short: "undo an interrupted conversion, online, back to the plaintext layout",
		Long: `Walk an interrupted conversion back, online, to the original plaintext layout:
the data already encrypted is decrypted in place, the LVM label is restored
and the logical volumes are moved back onto the disk. The passphrase (or key
file) is asked again.

` + findRunHelp,
		Args: maxArgs(1),
		RunE: mark(func(cmd *cobra.Command, args []string) error { return a.runAbort(cmd.Context(), o, args) }),
	}
	f := cmd.Flags()
	f.StringVar(&o.journal, "journal", "", "journal of the run")
	f.StringVar(&o.device, "device", "", "the disk's path now, if it changed since the run began")
	o.key.register(f)
	o.registerOldKey(f)
	o.registerBatch(f)
	return cmd
}

// runResume is `dmconvert resume`.
func (a *app) runResume(ctx context.Context, o *continueOptions, args []string) (err error) {
	res := &result{Command: "resume"}
	defer func() { a.emitResult(res, err) }()
	return a.continueRun(ctx, o, args, res, false)
}

// runAbort is `dmconvert abort`.
func (a *app) runAbort(ctx context.Context, o *continueOptions, args []string) (err error) {
	res := &result{Command: "abort"}
	defer func() { a.emitResult(res, err) }()
	return a.continueRun(ctx, o, args, res, true)
}

func (a *app) continueRun(ctx context.Context, o *continueOptions, args []string, res *result, abort bool) error {
	device := ""
	if len(args) > 0 {
		device = args[0]
	}
	if err := o.key.validate(); err != nil {
		return err
	}
	crypttab := o.crypttabFile
	if o.crypttab && crypttab == "" {
		crypttab = a.crypttab
	}
	if a.reexec != nil {
		if err := a.reexec(); err != nil {
			return fmt.Errorf("re-executing dmconvert from memory: %w", err)
		}
	}
	jpath, err := a.locateRun(device, o.journal)
	if err != nil {
		return err
	}
	res.Journal = jpath
	ri, err := convert.InspectJournal(jpath, a.statusLockTimeout)
	if err != nil {
		if errors.Is(err, journal.ErrLocked) {
			return fmt.Errorf("%s: another dmconvert is running this conversion (dmconvert status shows how far it is): %w", jpath, err)
		}
		return err
	}
	res.fromSpec(ri.Spec)
	if ri.Finished() {
		return usagef("the %s run of %s recorded in %s is already %s; nothing to %s", ri.Op, ri.Device, jpath, ri.Status, res.Command)
	}
	override := o.device
	if override == "" && device != "" {
		override = device
	}
	disk := ri.Device
	if override != "" {
		disk = override
		res.Device = override
	}
	if err := o.checkHash(ri.Spec, a.stdinTTY); err != nil {
		return err
	}
	var key []byte
	if !ri.Spec.Plain() || ri.Spec.PlainTo == "luks2" {
		// A plain rekey has no passphrase, unless it turns the volume
		// into LUKS2: then it opens the new header.
		key, err = a.readKey(o.key, disk)
		if err != nil {
			return err
		}
		defer luks.WipeBytes(key)
	}
	e, closeEngine, err := a.engine(0)
	if err != nil {
		return err
	}
	defer closeEngine()
	if !a.quiet && !a.json {
		verb := "Resuming"
		if abort {
			verb = "Aborting"
		}
		what := ri.Op
		if ri.Aborting {
			what = "abort of the " + ri.Op
		}
		fmt.Fprintf(a.stdout, "%s the %s of %s (%s, %.1f%% copied; journal %s)\n",
			verb, what, disk, ri.PhaseName, percent(ri.DoneBytes, ri.TotalBytes), jpath)
	}
	pr := a.publish(a.newProgress(), jpath, res.Command, disk)
	e.Progress = pr
	st := a.startStopper(pr.note)
	ro := convert.ResumeOptions{RunOptions: convert.RunOptions{Stop: st.requested}, Journal: jpath, Device: override, Open: opener(key)}
	if ri.Spec.Plain() {
		ro.Passphrase = key
		ro.OldKey = func() ([]byte, error) {
			if o.hash != "" {
				return a.plainPassphraseKey(o.hash, ri.Spec.Name, ri.Spec.OldCrypt.KeyBytes, disk)
			}
			if o.oldKeyFile == "" {
				return nil, usagef("%s: no live mapping shows the old key of this plain rekey: give the old key file with --old-key-file, or, for a mapping opened with a passphrase, its hash with --hash", disk)
			}
			return a.readKey(keyOptions{file: o.oldKeyFile}, disk)
		}
	}
	if abort {
		err = e.Abort(ctx, ro)
	} else {
		err = e.Resume(ctx, ro)
	}
	st.close()
	pr.finish(err == nil)
	if err != nil {
		a.noteKeptState(jpath, err)
		return err
	}
	final, ferr := convert.InspectJournal(jpath, a.statusLockTimeout)
	if ferr != nil {
		return fmt.Errorf("the run completed, but its journal %s cannot be read back: %w", jpath, ferr)
	}
	spec := *final.Spec
	if override != "" {
		spec.Disk.Path = override
	}
	switch {
	case final.Status == journal.StatusDone && spec.Op == "decrypt":
		res.Outcome = "done"
		a.finishDecrypt(res, &spec)
	case final.Status == journal.StatusDone && spec.Op == "rekey":
		res.Outcome = "done"
		a.finishRekey(res, &spec)
	case final.Status == journal.StatusDone:
		res.Outcome = "done"
		a.finishEncrypt(res, &spec, crypttab)
	case final.Status == journal.StatusAborted && spec.Op == "rekey":
		res.Outcome = "aborted"
		res.fromSpec(&spec)
		if !a.quiet && !a.json {
			fmt.Fprintf(a.stdout, "\nAborted: %s keeps its old volume key, open as /dev/mapper/%s.\n", spec.Disk.Path, spec.Name)
			if f := spec.NewKeyFile + spec.HeaderFile; spec.Plain() && f != "" {
				fmt.Fprintf(a.stdout, "%s holds the aborted run's key, which no data uses: delete it.\n", f)
			}
		}
	case final.Status == journal.StatusAborted && spec.Op == "decrypt":
		res.Outcome = "aborted"
		res.fromSpec(&spec)
		if !a.quiet && !a.json {
			if spec.VG == "" {
				fmt.Fprintf(a.stdout, "\nAborted: %s is LUKS again, open as /dev/mapper/%s.\n", spec.Disk.Path, spec.Name)
			} else {
				fmt.Fprintf(a.stdout, "\nAborted: %s is LUKS again, open as /dev/mapper/%s with volume group %s on it.\n", spec.Disk.Path, spec.Name, spec.VG)
			}
		}
	case final.Status == journal.StatusAborted:
		res.Outcome = "aborted"
		a.finishAbort(res, &spec)
	default:
		return fmt.Errorf("the run returned, but journal %s says %s", jpath, final.Status)
	}
	return nil
}

// statusOptions are the flags of status.
type statusOptions struct {
	journal string
}

func (a *app) statusCommand(mark markFunc) *cobra.Command {
	o := &statusOptions{}
	cmd := &cobra.Command{
		Use:   "status [DEVICE]",
		Short: "show how far a conversion is, without a passphrase",
		Long: `Show the state of a conversion: what it does, how far it is, and what to do
next. It needs no passphrase and works while another dmconvert runs the
conversion (it then shows what the disk's checkpoint says).

` + findRunHelp + ` Without DEVICE or --journal every unfinished run there is shown.`,
		Args: maxArgs(1),
		RunE: mark(func(cmd *cobra.Command, args []string) error { return a.runStatus(cmd.Context(), o, args) }),
	}
	cmd.Flags().StringVar(&o.journal, "journal", "", "journal of the run")
	return cmd
}

// runStatus is one run as status shows it.
type runStatus struct {
	Journal string `json:"journal"`
	// InProgressElsewhere: another process holds the journal (the run
	// is going on).
	InProgressElsewhere bool `json:"in_progress_elsewhere,omitempty"`
	// Live is the position the running process publishes (nil before
	// its first step, or when it cannot publish).
	Live *liveProgress    `json:"live,omitempty"`
	Run  *convert.RunInfo `json:"run,omitempty"`
	Disk *diskView        `json:"disk,omitempty"`
	Next string           `json:"next,omitempty"`
}

// runStatus is `dmconvert status`.
func (a *app) runStatus(ctx context.Context, o *statusOptions, args []string) (err error) {
	res := &result{Command: "status", Outcome: "status"}
	defer func() { a.emitResult(res, err) }()
	device := ""
	if len(args) > 0 {
		device = args[0]
		res.Device = device
	}
	var dv *diskView
	if device != "" {
		if dv, err = a.readDisk(device); err != nil {
			return err
		}
	}
	var paths []string
	switch {
	case o.journal != "":
		paths = []string{o.journal}
	case dv != nil && dv.journal != "" && fileExists(dv.journal):
		paths = []string{dv.journal}
	default:
		entries, err := a.scanJournals()
		if err != nil {
			return err
		}
		for _, e := range entries {
			switch {
			case device == "" && e.unfinished():
				paths = append(paths, e.path)
			case device != "" && e.locked:
				// Unknown device: it may be this one.
				paths = append(paths, e.path)
			case device != "" && !e.locked && sameDevice(e.info.Device, device):
				paths = append(paths, e.path)
			}
		}
		// A running conversion whose journal is elsewhere (--journal).
		for _, l := range a.liveRuns() {
			if (device == "" || sameDevice(l.Device, device)) && !containsSameFile(paths, l.Journal) {
				paths = append(paths, l.Journal)
			}
		}
	}
	for _, p := range paths {
		rs, err := a.statusOf(p, dv)
		if err != nil {
			return err
		}
		res.Runs = append(res.Runs, rs)
	}
	if len(res.Runs) == 0 {
		res.Outcome = "none"
	}
	if a.json || a.quiet {
		return nil
	}
	if len(res.Runs) == 0 {
		if dv != nil {
			fmt.Fprintf(a.stdout, "%s: no dmconvert run found (the disk carries: %s)\n", device, dv.Identity)
		} else {
			fmt.Fprintf(a.stdout, "no unfinished dmconvert run in %s\n", a.journalDir)
		}
		return nil
	}
	for i, rs := range res.Runs {
		if i > 0 {
			fmt.Fprintln(a.stdout)
		}
		a.printStatus(rs)
	}
	return nil
}

// containsSameFile reports whether one of paths names the file p.
func containsSameFile(paths []string, p string) bool {
	for _, q := range paths {
		if sameDevice(q, p) {
			return true
		}
	}
	return false
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func (a *app) statusOf(path string, dv *diskView) (*runStatus, error) {
	rs := &runStatus{Journal: path, Disk: dv}
	ri, err := convert.InspectJournal(path, a.statusLockTimeout)
	if errors.Is(err, journal.ErrLocked) {
		rs.InProgressElsewhere = true
		rs.Live = readLive(a.liveDir, path)
		return rs, nil
	}
	if err != nil {
		return nil, err
	}
	rs.Run = ri
	rs.Journal = ri.Journal
	dev := ri.Device
	switch ri.Status {
	case journal.StatusDone, journal.StatusAborted:
	case journal.StatusAborting:
		rs.Next = fmt.Sprintf("dmconvert resume %s (continues the abort)", dev)
	default:
		rs.Next = fmt.Sprintf("dmconvert resume %s, or undo it: dmconvert abort %s", dev, dev)
	}
	return rs, nil
}

func (a *app) printStatus(rs *runStatus) {
	w := a.stdout
	fmt.Fprintf(w, "journal:   %s\n", rs.Journal)
	if rs.InProgressElsewhere {
		if l := rs.Live; l != nil {
			fmt.Fprintf(w, "status:    in progress: dmconvert %s of %s, process %d, since %s\n", l.Command, l.Device, l.PID, l.Started.Local().Format(time.RFC3339))
			line := fmt.Sprintf("%.1f%% (%s of %s) copied", percent(l.Done, l.Total), humanBytes(l.Done), humanBytes(l.Total))
			if l.Phase != "" {
				line = l.Phase + "; " + line
			}
			if r := l.Rate(); r > 0 {
				line += fmt.Sprintf(", %s/s", humanBytes(uint64(r)))
				if l.Total > l.Done {
					line += fmt.Sprintf(", about %v left", (time.Duration(float64(l.Total-l.Done)/r) * time.Second).Round(time.Second))
				}
			}
			fmt.Fprintf(w, "position:  %s\n", line)
			fmt.Fprintf(w, "updated:   %s\n", l.Updated.Local().Format(time.RFC3339))
		} else {
			fmt.Fprintf(w, "status:    in progress by another process\n")
		}
	}
	if ri := rs.Run; ri != nil {
		what := ri.Op
		if ri.Aborting {
			what = "abort of " + ri.Op
		}
		fmt.Fprintf(w, "run:       %s of %s -> /dev/mapper/%s (LUKS%d, UUID %s), run %s\n", what, ri.Device, ri.Name, ri.LUKSVersion, ri.LUKSUUID, ri.ID)
		status := ri.Status
		if ri.Status == journal.StatusRunning {
			status += " (no process holds the journal: the run was killed or the machine stopped)"
		}
		fmt.Fprintf(w, "status:    %s\n", status)
		if ri.Phases > 0 {
			ph := min(ri.Phase+1, ri.Phases)
			fmt.Fprintf(w, "position:  phase %d of %d: %s; %.1f%% (%s of %s) copied\n", ph, ri.Phases, ri.PhaseName,
				percent(ri.DoneBytes, ri.TotalBytes), humanBytes(ri.DoneBytes), humanBytes(ri.TotalBytes))
		}
		if !ri.Updated.IsZero() {
			fmt.Fprintf(w, "updated:   %s\n", ri.Updated.Local().Format(time.RFC3339))
		}
		if ri.Message != "" {
			fmt.Fprintf(w, "error:     %s\n", ri.Message)
		}
	}
	if dv := rs.Disk; dv != nil {
		line := fmt.Sprintf("%s carries %s", dv.Path, dv.Identity)
		if cp := dv.Checkpoint; cp != nil {
			line += fmt.Sprintf("; its checkpoint: %s run %s, %s plan, phase %d, boundary %d", cp.Op, cp.Run, cp.Plan, cp.Phase+1, cp.Boundary)
		}
		if dv.Error != "" {
			line += " (" + dv.Error + ")"
		}
		fmt.Fprintf(w, "disk:      %s\n", line)
	}
	if rs.Next != "" {
		fmt.Fprintf(w, "next:      %s\n", rs.Next)
	}
}

// checkHash refuses a --hash that cannot be used, before anything is read
// or written.
func (o *continueOptions) checkHash(spec *convert.Spec, stdinTTY bool) error {
	if o.hash == "" {
		return nil
	}
	switch {
	case !spec.Plain():
		return usagef("--hash is for the rekey of a plain dm-crypt mapping; this run is a %s of a LUKS volume", spec.Op)
	case spec.TCrypt:
		return usagef("--hash is for the rekey of a plain dm-crypt mapping; this run converts a TrueCrypt volume, whose old key comes from its passphrase")
	}
	return checkOldKeyFlags(o.hash, o.oldKeyFile, spec.PlainTo == "luks2", o.key.file, stdinTTY, spec.OldCrypt.KeyBytes)
}

// checkOldKeyFlags refuses a --hash that cannot be used with the other
// flags (keyBytes: the old key's size, 0 when not known yet).
func checkOldKeyFlags(hash, oldKeyFile string, toLUKS2 bool, keyFile string, stdinTTY bool, keyBytes int) error {
	switch {
	case hash == "":
		return nil
	case oldKeyFile != "":
		return usagef("--hash makes the old key from a passphrase, --old-key-file gives the key itself: give one of them (cryptsetup's plain mode does not hash key files either)")
	case toLUKS2 && !stdinTTY && (keyFile == "" || keyFile == "-"):
		return usagef("with --hash the old passphrase is read from standard input: give the new header's passphrase with --key-file FILE")
	}
	n := keyBytes
	if n == 0 {
		n = 64 // the largest plain key; the real size is checked when known
	}
	if _, err := luks.PlainKey(hash, make([]byte, n), n); err != nil {
		return usagef("--hash %s: %v", hash, err)
	}
	return nil
}

// plainPassphraseKey asks for the passphrase a plain mapping was opened
// with (or reads the first line of standard input) and makes the old key
// from it as cryptsetup's plain mode does.
func (a *app) plainPassphraseKey(hash, name string, keyBytes int, disk string) ([]byte, error) {
	pass, err := luks.ReadKey((&keyOptions{}).source(a, fmt.Sprintf("Enter the passphrase plain mapping %s was opened with: ", name)))
	if err != nil {
		return nil, fmt.Errorf("%s: reading the old passphrase: %w", disk, err)
	}
	defer luks.WipeBytes(pass)
	return luks.PlainKey(hash, pass, keyBytes)
}
