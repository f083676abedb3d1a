package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/luks"
)

// decryptOptions are the flags of `dmconvert decrypt`.
type decryptOptions struct {
	onlineOptions
	shrinkPV  bool
	headerGap bool
}

// onlineOptions are the flags decrypt and rekey share.
type onlineOptions struct {
	key        keyOptions
	journal    string
	chunkSize  sizeFlag
	regionSize sizeFlag
	dryRun     bool
	yes        bool
	batch      bool
}

func (o *onlineOptions) register(f *pflag.FlagSet, journalDefault, chunkHelp string) {
	o.key.register(f)
	f.StringVar(&o.journal, "journal", "", "journal file (default "+journalDefault+"); must not live on TARGET")
	f.Var(&o.chunkSize, "chunk-size", chunkHelp)
	f.Var(&o.regionSize, "region-size", "dm-mirror region size, a power of two (default 4.0 MiB)")
	f.BoolVar(&o.dryRun, "dry-run", false, "print the plan and change nothing (the passphrase is still checked)")
	f.BoolVar(&o.yes, "yes", false, "do not ask for confirmation")
	f.BoolVarP(&o.batch, "batch-mode", "q", false, "do not ask for confirmation (as cryptsetup's --batch-mode)")
}

// openOnline checks the shared flags, re-executes from memory (not for a
// dry run), opens the engine and reads the passphrase of TARGET. done
// wipes the passphrase and closes the engine.
func (a *app) openOnline(o *onlineOptions, target string) (e *convert.Engine, pass []byte, chunk convert.Sectors, done func(), err error) {
	return a.openOnlineKey(o, target, nil)
}

// keyMode says what passphrase a command reads.
type keyMode int

const (
	keyExisting keyMode = iota // of an existing header
	keyNone                    // none (a plain mapping's key is in its table)
	keyNew                     // of a new header: asked twice on a terminal
)

// openOnlineKey is openOnline; mode, when not nil, says for the engine
// which passphrase to read.
func (a *app) openOnlineKey(o *onlineOptions, target string, mode func(*convert.Engine) keyMode) (e *convert.Engine, pass []byte, chunk convert.Sectors, done func(), err error) {
	if err := o.key.validate(); err != nil {
		return nil, nil, 0, nil, err
	}
	chunk, region, err := chunkAndRegion(o.chunkSize, o.regionSize)
	if err != nil {
		return nil, nil, 0, nil, err
	}
	if !o.dryRun && a.reexec != nil {
		if err := a.reexec(); err != nil {
			return nil, nil, 0, nil, fmt.Errorf("re-executing dmconvert from memory: %w", err)
		}
	}
	e, closeEngine, err := a.engine(region)
	if err != nil {
		return nil, nil, 0, nil, err
	}
	m := keyExisting
	if mode != nil {
		m = mode(e)
	}
	switch m {
	case keyNone:
		return e, nil, chunk, func() { closeEngine() }, nil
	case keyNew:
		pass, err = a.readNewKey(o.key, target)
	default:
		pass, err = a.readKey(o.key, target)
	}
	if err != nil {
		closeEngine()
		return nil, nil, 0, nil, err
	}
	return e, pass, chunk, func() { luks.WipeBytes(pass); closeEngine() }, nil
}

func (a *app) decryptCommand(mark markFunc) *cobra.Command {
	o := &decryptOptions{}
	cmd := &cobra.Command{
		Use:   "decrypt TARGET",
		Short: "decrypt a LUKS device in place while its file system or logical volumes are in use",
		Long: `Decrypt TARGET, an open LUKS mapping (its name, /dev/mapper/NAME, or the
device under it), back to plaintext on the device, online. On the mapping
there may be an LVM physical volume whose logical volumes are active and
mounted, or a file system, mounted or not. The data moves toward the start
of the device by the LUKS header size.

With working space after a physical volume (one header size; see
--shrink-pv) it is the exact reverse of encrypt: the header stays valid
(marked "conversion in progress", so stock cryptsetup refuses to open it)
until the last step, which writes the LVM label back.

Without it, and always for a file system, the header area itself is the
working space: the first MiB of the data is first held, still encrypted,
over the start of the header (the journal keeps the header), the rest moves
through the header area, and the first MiB comes back last. While it runs
the device shows no header and no file system to other tools; abort writes
the header back. A file system stays mounted on /dev/mapper/NAME, which
becomes a plain linear map of the device until the next reboot; after it,
the file system is found on the device itself (same UUID).

The passphrase or key file is needed to read the volume key from the
header (the kernel keeps cryptsetup's keys where no other program can
read them).`,
		Args: exactArgs(1),
		RunE: mark(func(cmd *cobra.Command, args []string) error { return a.runDecrypt(cmd.Context(), o, args) }),
	}
	f := cmd.Flags()
	o.register(f, "/var/lib/dmconvert/<PV UUID, or LUKS UUID>.journal", "bytes copied per step, with K/M/G suffix (default and maximum: the header size)")
	f.BoolVar(&o.shrinkPV, "shrink-pv", false, "shrink the physical volume first when its last extents are free and it is too large")
	f.BoolVar(&o.headerGap, "header-gap", false, "use the header area as the working space even when there is room after the physical volume (always so for a file system)")
	return cmd
}

// runDecrypt is `dmconvert decrypt`.
func (a *app) runDecrypt(ctx context.Context, o *decryptOptions, args []string) (err error) {
	res := &result{Command: "decrypt"}
	defer func() { a.emitResult(res, err) }()
	if len(args) != 1 {
		return usagef("decrypt takes one TARGET")
	}
	target := args[0]
	res.Device = target
	e, pass, chunk, done, err := a.openOnline(&o.onlineOptions, target)
	if err != nil {
		return err
	}
	defer done()
	ep, err := e.PlanDecrypt(ctx, convert.DecryptOptions{Target: target, Journal: o.journal, Chunk: chunk, ShrinkPV: o.shrinkPV, HeaderGap: o.headerGap, Open: opener(pass)})
	if err != nil {
		return err
	}
	defer ep.Wipe()
	return a.runPlan(ctx, e, ep, res, planned{
		dryRun: o.dryRun, confirmed: o.yes || o.batch, verb: "decrypt",
		print: a.printDecryptPlan, finish: a.finishDecrypt,
	})
}

// planned says how runPlan shows, confirms and reports a plan.
type planned struct {
	dryRun, confirmed bool
	verb              string // what the confirmation says will happen
	print             func(*convert.EncryptPlan)
	finish            func(*result, *convert.Spec)
}

// runPlan prints the plan (or only that with --dry-run), asks for
// confirmation, executes it with progress and signal handling, and
// reports the outcome.
func (a *app) runPlan(ctx context.Context, e *convert.Engine, ep *convert.EncryptPlan, res *result, p planned) error {
	a.takePlan(res, ep)
	if !a.json && !a.quiet {
		p.print(ep)
	}
	if p.dryRun {
		res.Outcome = "planned"
		res.Plan = ep.Spec
		if !a.json && !a.quiet {
			fmt.Fprintln(a.stdout, "Dry run: nothing was changed.")
		}
		return nil
	}
	if !p.confirmed {
		if err := a.confirmVerb(p.verb, ep.Spec.Disk.Path); err != nil {
			return err
		}
	}
	// Without a prompt nothing was waited for since the plan.
	if err := a.execute(ctx, e, ep, p.confirmed); err != nil {
		return err
	}
	res.Outcome = "done"
	p.finish(res, ep.Spec)
	return nil
}

// execute runs a plan with a progress display and SIGINT/SIGTERM handling;
// on failure it says where the state is kept. fresh: the plan was made
// just now, with no prompt since (convert.RunOptions.Fresh).
func (a *app) execute(ctx context.Context, e *convert.Engine, ep *convert.EncryptPlan, fresh bool) error {
	pr := a.publish(a.newProgress(), ep.Journal, ep.Spec.Op, ep.Spec.Disk.Path)
	e.Progress = pr
	st := a.startStopper(pr.note)
	err := e.Execute(ctx, ep, convert.RunOptions{Stop: st.requested, Fresh: fresh})
	st.close()
	pr.finish(err == nil)
	if err != nil {
		a.noteKeptState(ep.Journal, err)
	}
	return err
}

func (a *app) printDecryptPlan(ep *convert.EncryptPlan) {
	s, g := ep.Spec, ep.Spec.Forward.Geometry
	w := a.stdout
	fmt.Fprintf(w, "Plan: decrypt %s (LUKS%d, %s, UUID %s), open as /dev/mapper/%s, in place and online\n",
		s.Disk.Path, s.LUKSVersion, s.OldCrypt.Cipher, s.LUKSUUID, s.Name)
	if s.VG != "" {
		fmt.Fprintf(w, "  volume group:  %s (PV %s)\n", s.VG, s.PVDevice)
	} else {
		fmt.Fprintf(w, "  on it:         no LVM physical volume (a file system?): /dev/mapper/%s stays, a plain linear map of %s\n", s.Name, s.Disk.Path)
	}
	fmt.Fprintf(w, "  data:          %s (%d sectors) move %s toward the start of the disk", humanBytes(g.Payload*512), g.Payload, humanBytes(g.Header*512))
	if s.Forward.HeaderRestore {
		fmt.Fprintf(w, ", through the header area (the journal keeps the header)")
	}
	if ep.ShrinkTo > 0 && ep.PV != nil {
		fmt.Fprintf(w, "; the PV is first shrunk from %d to %d sectors (pvresize)", ep.PV.Size, ep.ShrinkTo)
	}
	fmt.Fprintln(w)
	printJournal(w, ep, "")
	printPhases(w, s)
}

// confirmVerb asks for YES before a destructive command.
func (a *app) confirmVerb(verb, dev string) error {
	fmt.Fprintf(a.stderr, "\nWARNING!\n========\nThis will %s %s in place while it is in use.\n"+
		"Back up its data first; an interrupted run must be resumed or aborted with dmconvert.\n\n"+
		"Are you sure? (Type 'yes' in capital letters): ", verb, dev)
	line, err := readLine(a.stdin)
	if err != nil {
		return usagef("no confirmation: %v", err)
	}
	if line != "YES" {
		return usagef("operation aborted: the confirmation was not 'YES'; nothing was changed")
	}
	return nil
}

// finishDecrypt reports a completed decrypt.
func (a *app) finishDecrypt(r *result, s *convert.Spec) {
	r.fromSpec(s)
	r.Mapping = ""
	r.FreeBytes = freeAfterDecryptedPV(s)
	if a.quiet || a.json {
		return
	}
	if s.VG == "" {
		fmt.Fprintf(a.stdout, "\nDone: %s holds the plain data from its first sector; /dev/mapper/%s maps it until the next reboot.\n", s.Disk.Path, s.Name)
		fmt.Fprintf(a.stdout, "Remove the line for %s from /etc/crypttab (e.g. sed -i '/^%s[[:space:]]/d' /etc/crypttab),\n"+
			"make /etc/fstab name the file system by UUID= (not /dev/mapper/%s), and rebuild the initramfs if it is needed at boot.\n", s.Name, s.Name, s.Name)
		return
	}
	fmt.Fprintf(a.stdout, "\nDone: %s is a plain LVM physical volume again; volume group %s is on it.\n", s.Disk.Path, s.VG)
	fmt.Fprintf(a.stdout, "Remove the line for %s from /etc/crypttab (e.g. sed -i '/^%s[[:space:]]/d' /etc/crypttab),\n"+
		"and rebuild the initramfs if the volume group is needed at boot (update-initramfs -u, or dracut -f).\n", s.Name, s.Name)
	if r.FreeBytes > 0 {
		fmt.Fprintf(a.stdout, "\nThe physical volume ends %s before the end of %s (the header's space); grow it into that space with:\n"+
			"  pvresize %s\n", humanBytes(r.FreeBytes), s.Disk.Path, s.Disk.Path)
	}
}
