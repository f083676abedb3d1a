package main

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/dmconvert/dmconvert/convert"
)

// result is the final JSON line of every command with --json:
// {"result": {...}}.
type result struct {
	Command  string `json:"command"`
	Outcome  string `json:"outcome"` // done, aborted, planned, status, or the error's class (exitcodes.go)
	ExitCode int    `json:"exit_code"`
	Error    string `json:"error,omitempty"`
	Device   string `json:"device,omitempty"`
	Name     string `json:"name,omitempty"`
	Mapping  string `json:"mapping,omitempty"`
	Journal  string `json:"journal,omitempty"`
	// JournalFS names the memory-backed file system the journal is on
	// (tmpfs, ramfs): a reboot or power cut loses it.
	JournalFS   string `json:"journal_fs,omitempty"`
	LUKSVersion int    `json:"luks_version,omitempty"`
	LUKSUUID    string `json:"luks_uuid,omitempty"`
	VG          string `json:"vg,omitempty"`
	// Crypttab is the line for /etc/crypttab; CrypttabFile where it was
	// appended (--crypttab), CrypttabError why it was not.
	Crypttab      string `json:"crypttab,omitempty"`
	CrypttabFile  string `json:"crypttab_file,omitempty"`
	CrypttabError string `json:"crypttab_error,omitempty"`
	// FreeBytes is the space pvresize can give to the PV: after an
	// encrypt, what follows it inside the new mapping; after a decrypt,
	// what follows it on the disk.
	FreeBytes uint64 `json:"free_bytes,omitempty"`
	// Plan is the whole plan (--dry-run).
	Plan *convert.Spec `json:"plan,omitempty"`
	// Runs is what status found.
	Runs []*runStatus `json:"runs,omitempty"`
}

// takePlan records the plan in the result; with --quiet, which prints no
// plan, the journal's warning goes to stderr.
func (a *app) takePlan(r *result, ep *convert.EncryptPlan) {
	r.fromSpec(ep.Spec)
	r.Journal = ep.Journal
	r.JournalFS = ep.JournalFS
	if a.quiet && !a.json && ep.JournalFS != "" {
		fmt.Fprintf(a.stderr, "dmconvert: warning: journal %s is on %s: a reboot or power cut loses it, and the run with it\n", ep.Journal, ep.JournalFS)
	}
}

// printJournal prints a plan's journal line (what follows the path in
// note, if anything), and a warning when the journal is on a file system
// that a reboot empties.
func printJournal(w io.Writer, ep *convert.EncryptPlan, note string) {
	fmt.Fprintf(w, "  journal:       %s%s\n", ep.Journal, note)
	if ep.JournalFS != "" {
		fmt.Fprintf(w, "  WARNING:       the journal is on %s, which a reboot or power cut empties: if the machine goes down before the run ends, the run can be neither resumed nor aborted. Give --journal a path on a disk (not this one).\n", ep.JournalFS)
	}
}

func (r *result) fromSpec(s *convert.Spec) {
	r.Device = s.Disk.Path
	r.Name = s.Name
	r.Mapping = "/dev/mapper/" + s.Name
	r.LUKSVersion = s.LUKSVersion
	r.LUKSUUID = s.LUKSUUID
	r.VG = s.VG
}

// emitResult prints the result line with --json.
func (a *app) emitResult(r *result, err error) {
	if !a.json {
		return
	}
	r.ExitCode = exitCode(err)
	if err != nil {
		r.Outcome = outcome(r.ExitCode)
		r.Error = err.Error()
	}
	b, merr := json.Marshal(struct {
		Result *result `json:"result"`
	}{r})
	if merr != nil {
		fmt.Fprintf(a.stderr, "dmconvert: encoding the result: %v\n", merr)
		return
	}
	fmt.Fprintf(a.stdout, "%s\n", b)
}

// printPlan shows what an encrypt run will do.
func (a *app) printPlan(ep *convert.EncryptPlan, cfg *encryptConfig) {
	s := ep.Spec
	w := a.stdout
	d := s.Disk
	g := s.Forward.Geometry
	fmt.Fprintf(w, "Plan: encrypt %s in place, online\n", d.Path)
	fmt.Fprintf(w, "  disk:          %s, %s (%d sectors), logical block size %d\n", d.Path, humanBytes(d.Size*512), d.Size, d.LogicalBlockSize)
	if ep.PV != nil {
		fmt.Fprintf(w, "  LVM:           volume group %s, PV UUID %s\n", ep.PV.VG, ep.PV.UUID)
		var lvs []string
		for _, lv := range ep.PV.LVs {
			st := "inactive"
			if lv.Active {
				st = "active"
			}
			lvs = append(lvs, fmt.Sprintf("%s (%s)", lv.Name, st))
		}
		if len(lvs) > 0 {
			fmt.Fprintf(w, "  volumes:       %s\n", strings.Join(lvs, ", "))
		}
	}
	fmt.Fprintf(w, "  data:          %s (%d sectors) kept", humanBytes(g.Payload*512), g.Payload)
	if ep.ShrinkTo > 0 && ep.PV != nil {
		fmt.Fprintf(w, "; the PV is first shrunk from %d to %d sectors (pvresize)", ep.PV.Size, ep.ShrinkTo)
	}
	fmt.Fprintln(w)
	kdf := cfg.luks.PBKDF.Type
	fmt.Fprintf(w, "  LUKS:          LUKS%d, %s, %d-bit key, %d-byte sectors, header %s, %s, UUID %s\n",
		s.LUKSVersion, s.Crypt.Cipher, s.Crypt.KeyBytes*8, s.Crypt.SectorSize, humanBytes(g.Header*512), kdf, s.LUKSUUID)
	fmt.Fprintf(w, "  mapping:       /dev/mapper/%s\n", s.Name)
	if len(s.Stacked) > 0 {
		names := make([]string, 0, len(s.Stacked))
		for n := range s.Stacked {
			names = append(names, n)
		}
		sort.Strings(names)
		fmt.Fprintf(w, "  moved onto it: %s\n", strings.Join(names, ", "))
	}
	printJournal(w, ep, "")
	var chunk convert.Sectors // the largest step (an encrypt's head leaves in one)
	for _, ph := range s.Forward.Phases {
		if ph.Kind == convert.PhaseMove {
			chunk = max(chunk, ph.Chunk)
		}
	}
	fmt.Fprintf(w, "  copy:          %s in steps of at most %s\n", humanBytes(s.Forward.BytesTotal()), humanBytes(chunk*512))
	fmt.Fprintln(w, "  phases:")
	for i, ph := range s.Forward.Phases {
		line := convert.DescribePhase(ph)
		if ph.Kind == convert.PhaseMove {
			line += fmt.Sprintf(" (%s)", humanBytes(ph.Length()*512))
		}
		fmt.Fprintf(w, "    %d. %s\n", i+1, line)
	}
}

// freeAfterPV is the space the conversion leaves after the PV inside the
// new mapping (the mapping is the disk minus the header).
func freeAfterPV(s *convert.Spec) uint64 {
	g := s.Forward.Geometry
	if g.DiskSize < g.Header+g.Payload {
		return 0
	}
	return (g.DiskSize - g.Header - g.Payload) * 512
}

// freeAfterDecryptedPV is the space a decrypt leaves on the disk after
// its PV (the header's and any working space's sectors): the PV keeps its
// size, now at the disk's first sector.
func freeAfterDecryptedPV(s *convert.Spec) uint64 {
	g := s.Forward.Geometry
	if s.VG == "" || g.DiskSize <= g.Payload {
		return 0
	}
	return (g.DiskSize - g.Payload) * 512
}

// finishEncrypt reports a completed encrypt: the crypttab line (appended
// with --crypttab), the initramfs note and the pvresize note.
func (a *app) finishEncrypt(r *result, s *convert.Spec, crypttabFile string) {
	r.fromSpec(s)
	r.Crypttab = crypttabLine(s.Name, s.LUKSUUID)
	r.FreeBytes = freeAfterPV(s)
	if crypttabFile != "" {
		added, err := appendCrypttab(crypttabFile, s.Name, r.Crypttab)
		if err != nil {
			r.CrypttabError = err.Error()
			fmt.Fprintf(a.stderr, "dmconvert: warning: the conversion is complete, but the crypttab line was not added: %v\n", err)
		} else {
			r.CrypttabFile = crypttabFile
			if !added && !a.quiet && !a.json {
				fmt.Fprintf(a.stdout, "%s already has this line.\n", crypttabFile)
			}
		}
	}
	if a.quiet || a.json {
		return
	}
	w := a.stdout
	vg := "its volume group"
	if s.VG != "" {
		vg = "volume group " + s.VG
	}
	fmt.Fprintf(w, "\nDone: %s is encrypted (LUKS%d, %s, %d-bit key); %s now lives on /dev/mapper/%s.\n",
		s.Disk.Path, s.LUKSVersion, s.Crypt.Cipher, s.Crypt.KeyBytes*8, vg, s.Name)
	if r.CrypttabFile != "" {
		fmt.Fprintf(w, "\ncrypttab line (in %s):\n", r.CrypttabFile)
	} else {
		fmt.Fprintf(w, "\nAdd this line to /etc/crypttab so it is opened at boot:\n")
	}
	fmt.Fprintf(w, "  %s\n", r.Crypttab)
	fmt.Fprintf(w, "\nIf the root file system or %s is needed at boot, update the initramfs:\n"+
		"  update-initramfs -u    (Debian, Ubuntu)\n"+
		"  dracut -f              (Fedora, RHEL)\n", vg)
	if r.FreeBytes > 0 {
		fmt.Fprintf(w, "\nThe conversion left %s free after the physical volume; grow it into that space with:\n"+
			"  pvresize /dev/mapper/%s\n", humanBytes(r.FreeBytes), s.Name)
	}
}

// finishAbort reports a completed abort.
func (a *app) finishAbort(r *result, s *convert.Spec) {
	r.fromSpec(s)
	r.Mapping = ""
	if a.quiet || a.json {
		return
	}
	vg := ""
	if s.VG != "" {
		vg = fmt.Sprintf("; volume group %s is on it", s.VG)
	}
	fmt.Fprintf(a.stdout, "\nAborted: %s is a plain LVM physical volume again%s.\n", s.Disk.Path, vg)
}
