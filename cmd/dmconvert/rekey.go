package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/luks"
)

// rekeyOptions are the flags of `dmconvert rekey`.
type rekeyOptions struct {
	onlineOptions
	removeOthers bool
	cipher       string
	keySize      int // bits
	newKeyFile   string
	luksType     string
	headerFile   string
	pim          int
	tcKeyfiles   []string
	alsoKeys     []string // --also-key-file
	kdf          kdfFlags
	inPlace      bool
	oldKeyFile   string // plain, key in the keyring
	hash         string // plain, key in the keyring, from a passphrase
}

func (a *app) rekeyCommand(mark markFunc) *cobra.Command {
	o := &rekeyOptions{}
	cmd := &cobra.Command{
		Use:   "rekey TARGET",
		Short: "give an open LUKS2 or LUKS1 volume a new volume key (and cipher) in place while it is in use",
		Long: `Re-encrypt TARGET, an open LUKS2 or LUKS1 mapping (its name, /dev/mapper/NAME, or the
device under it), with a new random volume key, online: a file system may be
mounted on it, or it may be an LVM physical volume with active logical
volumes. The new key keeps the volume's cipher and key size unless --cipher
(a dm-crypt cipher spec, e.g. serpent-xts-plain64 or aes-cbc-essiv:sha256) or
--key-size (bits; XTS takes twice the cipher's key, e.g. 256 or 512 for AES)
give others; the sector size stays. Both are checked before anything is
written: their form and, for the AES, Serpent and Twofish modes dmconvert
runs itself, the key size, then by the kernel (a crypt table with the new
cipher is loaded into a private device that is never used). A LUKS2 key's
keyslot is encrypted with the new cipher when it is an AES mode, else with
aes-xts-plain64 and a 512-bit key, as cryptsetup does when its crypto
backend cannot run a cipher.

The data area moves toward the start of the device by a small gap (--chunk-size,
default 4 MiB, at most what the keyslots area leaves unused) while it is
re-encrypted, so no sector is ever overwritten before its new copy is safe;
the keyslots area shrinks by that much. When the keyslots area leaves less
than 512 KiB unused (or with --in-place), the data is re-encrypted where it is
instead: one chunk at a time (--chunk-size, default 1 MiB) the mapping is
suspended, the chunk's old ciphertext is saved in the journal, and the chunk
is rewritten under the new key; the header keeps its size. The new key waits in a keyslot opened
by the same passphrase until the last step switches the header over and
removes the old key's keyslots. Until then stock cryptsetup refuses to open
the device (a LUKS2 requirement marks it); resume or abort with dmconvert.

LUKS1: the new key waits in a free keyslot (one must be free) while the
header's magic is disguised so that cryptsetup does not recognise it. A
LUKS1 header has one cipher and key size for the data and every keyslot, so
a new one (--cipher, --key-size; AES, Serpent or Twofish, which dmconvert
runs, e.g. aes-cbc-essiv:sha256 to aes-xts-plain64 with 512 bits) is rekeyed in place
and every keyslot moves to the new key size's layout at the end. Every LUKS1 keyslot keeps its area whether used or not, so the
gap is what the keyslot material leaves before the data, less 4 KiB for
dmconvert's checkpoint records: about 1 MiB with a 256-bit key, only 24 KiB
with cryptsetup's default 512-bit key, which is therefore rekeyed in place.

The passphrase or key file is needed to read the volume key from the header
(the kernel keeps cryptsetup's keys where no other program can read them),
and it opens the new key afterwards. Keyslots it does not open would lose
their key: they are refused unless --remove-other-keyslots. A volume
keeps more of its passphrases or key files with --also-key-file FILE (once
for each): each must open a keyslot of its own, and the new key gets a
keyslot opened by each (with the key derivation of the one it opened). A
resume needs only one of them.

Plain dm-crypt (a mapping opened by cryptsetup open --type plain): there is
no header, so --new-key-file PATH is required: the new random key is written
there (mode 0600, it must not exist, not on TARGET) when the run starts, as
the raw key cryptsetup's plain mode reads from a key file. The old key is
read from the mapping's table (no passphrase is asked); when the table names
a kernel keyring key instead, give it with --old-key-file FILE or, for a
mapping opened with a passphrase, --hash HASH (the passphrase is asked): it
is checked against the live mapping before anything is written. With no free space,
the data is re-encrypted where it is: one chunk at a time (--chunk-size,
default 1 MiB) the mapping is suspended, the chunk's old ciphertext is saved
in the journal, and the chunk is rewritten under the new key. A plain volume
carries no mark a boot-time tool could see: until the run ends, do not let
crypttab open it at boot (after a crash, resume with --old-key-file OLD-KEY-FILE,
or --hash for a passphrase, if no live mapping still shows the old key). When it ends, point crypttab at
the new key file.

Plain dm-crypt to LUKS2: --type luks2 --header FILE writes a LUKS2 header to
FILE (created, it must not exist, not on TARGET) instead of a key file: the
new key in a keyslot opened by the passphrase (--key-file, or asked twice;
--pbkdf, --pbkdf-force-iterations choose its KDF), the data segment where the
plain mapping's data is. cryptsetup refuses the header until the run ends;
then cryptsetup open --header FILE DEVICE NAME opens the volume. Without
--header, when the mapping's data starts far enough into the device
(cryptsetup open --type plain --offset; a 512-bit key needs 284 KiB) and runs
to its end, the header goes on the device, before the data, at the end of
the run (the journal keeps it until then); those sectors must not hold an
LVM label or a LUKS header, nor belong to another mapping. Then cryptsetup
open DEVICE NAME opens the volume.

TrueCrypt/VeraCrypt (a normal volume opened by cryptsetup open --type tcrypt,
one cipher: AES, Serpent or Twofish in XTS mode): --header FILE turns it into
LUKS2 with a detached header, opened by the volume's passphrase (asked, or
--key-file: a file holding the passphrase, not a TrueCrypt keyfile; its
keyfiles with --tcrypt-keyfile, a VeraCrypt PIM with --veracrypt-pim). The data
moves 128 KiB toward the start of the disk (over the TrueCrypt headers) while
it is re-encrypted, in steps of at most 128 KiB; at the end the old backup
headers are zeroed. A hidden volume inside it does not survive.`,
		Args: exactArgs(1),
		RunE: mark(func(cmd *cobra.Command, args []string) error { return a.runRekey(cmd.Context(), o, args) }),
	}
	f := cmd.Flags()
	o.register(f, "/var/lib/dmconvert/<LUKS UUID>.journal", "how far the data moves and the most copied per step, with K/M/G suffix (default 4M; in place, plain or --in-place: the step, default 1M)")
	f.BoolVar(&o.inPlace, "in-place", false, "LUKS: re-encrypt the data where it is (each chunk's old ciphertext saved in the journal first, the mapping suspended meanwhile) instead of moving it into the keyslots area; the default when that area leaves less than 512 KiB")
	f.BoolVar(&o.removeOthers, "remove-other-keyslots", false, "remove the keyslots the given passphrase does not open (their passphrases stop working)")
	f.StringArrayVar(&o.alsoKeys, "also-key-file", nil, "LUKS: another passphrase or key file of the volume (a file, read whole) that keeps working: the new key gets a keyslot for it too (repeat for several)")
	f.StringVarP(&o.cipher, "cipher", "c", "", "cipher of the new key, e.g. serpent-xts-plain64 (default: the volume's)")
	f.IntVarP(&o.keySize, "key-size", "s", 0, "size of the new key in bits, e.g. 256 (default: the volume's)")
	f.StringVar(&o.newKeyFile, "new-key-file", "", "plain dm-crypt: write the new key to this file (required for plain mappings)")
	f.StringVar(&o.luksType, "type", "", "plain dm-crypt: luks2 turns the volume into LUKS2, its header in --header FILE or, without it, on the device before the data (TrueCrypt: always luks2, --header FILE)")
	f.StringVar(&o.headerFile, "header", "", "plain dm-crypt with --type luks2, or TrueCrypt/VeraCrypt: write the detached LUKS2 header to this file")
	f.StringArrayVar(&o.tcKeyfiles, "tcrypt-keyfile", nil, "TrueCrypt/VeraCrypt: a keyfile of the volume (repeat for several; as cryptsetup --type tcrypt --key-file); a resume reads them again")
	f.StringVar(&o.oldKeyFile, "old-key-file", "", "plain dm-crypt whose table does not show its key (a key in the kernel keyring): the old key file (the key itself)")
	f.StringVar(&o.hash, "hash", "", "plain dm-crypt whose table does not show its key, opened with a passphrase: make the old key from the passphrase (asked, or the first line of standard input) with this hash, as cryptsetup open --type plain --hash does (its default: "+luks.DefaultPlainHash+")")
	f.IntVar(&o.pim, "veracrypt-pim", 0, "VeraCrypt: the volume's PIM (as cryptsetup --veracrypt-pim), if it was made with one")
	f.StringVar(&o.kdf.pbkdf, "pbkdf", "", "with --type luks2: the new keyslot's KDF: argon2id (default), argon2i or pbkdf2")
	f.Uint32Var(&o.kdf.iter, "pbkdf-force-iterations", 0, "with --type luks2: KDF iterations (pbkdf2) or time cost (argon2), skipping the benchmark")
	f.Uint32Var(&o.kdf.pbkdfMemory, "pbkdf-memory", 0, "with --type luks2: argon2 memory cost in KiB")
	return cmd
}

// runRekey is `dmconvert rekey`.
func (a *app) runRekey(ctx context.Context, o *rekeyOptions, args []string) (err error) {
	res := &result{Command: "rekey"}
	defer func() { a.emitResult(res, err) }()
	if len(args) != 1 {
		return usagef("rekey takes one TARGET")
	}
	target := args[0]
	res.Device = target
	// What can be checked without the header, before the passphrase.
	if err := convert.CheckRekeyCipher(o.cipher, o.keySize); err != nil {
		return usagef("%s: cannot rekey: %v", target, err)
	}
	plain := o.newKeyFile != "" || o.luksType != "" || o.headerFile != ""
	tcrypt := false
	e, pass, chunk, done, err := a.openOnlineKey(&o.onlineOptions, target, func(e *convert.Engine) keyMode {
		tcrypt = e.IsTCryptMapping(target)
		plain = plain || tcrypt || e.IsPlainMapping(target)
		// A plain mapping's key is in its table; --key-file is then the
		// passphrase of the LUKS2 header it turns into, if any. A
		// TrueCrypt volume's passphrase opens its header, then the new one.
		switch {
		case tcrypt:
			return keyExisting
		case plain && o.luksType == "luks2":
			return keyNew
		case plain:
			return keyNone
		}
		return keyExisting
	})
	if err != nil {
		return err
	}
	defer done()
	if o.pim < 0 || o.pim > luks.MaxTCryptPIM {
		return usagef("%s: --veracrypt-pim %d: not between 1 and %d", target, o.pim, luks.MaxTCryptPIM)
	}
	if o.pim != 0 && !tcrypt {
		return usagef("%s: --veracrypt-pim is for a VeraCrypt volume opened with cryptsetup open --type tcrypt --veracrypt", target)
	}
	if len(o.tcKeyfiles) > 0 && !tcrypt {
		return usagef("%s: --tcrypt-keyfile is for a TrueCrypt/VeraCrypt volume opened with cryptsetup open --type tcrypt", target)
	}
	if o.inPlace && tcrypt {
		return usagef("%s: --in-place: a TrueCrypt/VeraCrypt volume's data moves over its headers (a plain mapping is always rewritten in place)", target)
	}
	if (o.oldKeyFile != "" || o.hash != "") && (!plain || tcrypt) {
		return usagef("%s: --old-key-file and --hash give the old key of a plain dm-crypt mapping whose table does not show it", target)
	}
	if plain {
		oldKey, err := o.plainOldKey(a, target)
		if err != nil {
			return err
		}
		if o.removeOthers {
			return usagef("%s: --remove-other-keyslots: a plain mapping has no keyslots", target)
		}
		if len(o.alsoKeys) > 0 {
			return usagef("%s: --also-key-file: a plain or TrueCrypt mapping has no keyslots to keep", target)
		}
		po := convert.PlainRekeyOptions{Target: target, NewKeyFile: o.newKeyFile, Journal: o.journal, Chunk: chunk,
			Cipher: o.cipher, KeySize: o.keySize, Type: o.luksType, HeaderFile: o.headerFile, Passphrase: pass, PIM: o.pim, TCryptKeyfiles: o.tcKeyfiles,
			OldKey: oldKey}
		if o.luksType == "luks2" || tcrypt {
			if po.PBKDF, err = o.kdf.build(2); err != nil {
				return err
			}
		}
		ep, err := e.PlanPlainRekey(ctx, po)
		if err != nil {
			return err
		}
		defer ep.Wipe()
		return a.runPlan(ctx, e, ep, res, planned{
			dryRun: o.dryRun, confirmed: o.yes || o.batch, verb: "re-encrypt in place with a new key",
			print: a.printPlainRekeyPlan, finish: a.finishRekey,
		})
	}
	var also [][]byte
	defer func() {
		for _, k := range also {
			luks.WipeBytes(k)
		}
	}()
	for _, f := range o.alsoKeys {
		if f == "-" || f == "" {
			return usagef("%s: --also-key-file needs a file (standard input is the main passphrase's)", target)
		}
		k, err := a.readKey(keyOptions{file: f}, target)
		if err != nil {
			return fmt.Errorf("%s: --also-key-file %s: %w", target, f, err)
		}
		also = append(also, k)
	}
	ep, err := e.PlanRekey(ctx, convert.RekeyOptions{Target: target, Journal: o.journal, Chunk: chunk,
		Open: opener(pass), Passphrase: pass, AlsoPassphrases: also, RemoveOtherKeyslots: o.removeOthers, Cipher: o.cipher, KeySize: o.keySize, InPlace: o.inPlace})
	if err != nil {
		return nameAlsoKeyFiles(err, o.alsoKeys)
	}
	defer ep.Wipe()
	return a.runPlan(ctx, e, ep, res, planned{
		dryRun: o.dryRun, confirmed: o.yes || o.batch, verb: "re-encrypt with a new volume key",
		print: a.printRekeyPlan, finish: a.finishRekey,
	})
}

// plainOldKey checks --old-key-file and --hash and returns what reads the
// old key of a plain mapping whose table names a keyring key (nil when
// neither is given: the plan then refuses such a mapping).
func (o *rekeyOptions) plainOldKey(a *app, target string) (func(int) ([]byte, error), error) {
	if err := checkOldKeyFlags(o.hash, o.oldKeyFile, o.luksType == "luks2", o.key.file, a.stdinTTY, 0); err != nil {
		return nil, usagef("%s: %v", target, err)
	}
	switch {
	case o.hash != "":
		return func(n int) ([]byte, error) { return a.plainPassphraseKey(o.hash, target, n, target) }, nil
	case o.oldKeyFile != "":
		return func(int) ([]byte, error) { return a.readKey(keyOptions{file: o.oldKeyFile}, target) }, nil
	}
	return nil, nil
}

func (a *app) printRekeyPlan(ep *convert.EncryptPlan) {
	s, g := ep.Spec, ep.Spec.Forward.Geometry
	w := a.stdout
	fmt.Fprintf(w, "Plan: rekey %s (LUKS%d, %s, UUID %s), open as /dev/mapper/%s, in place and online\n",
		s.Disk.Path, s.LUKSVersion, s.Crypt.Cipher, s.LUKSUUID, s.Name)
	printVGAndCipher(w, s)
	if ph := s.Forward.Phases; len(ph) > 2 && ph[2].InPlace {
		fmt.Fprintf(w, "  data:          %s (%d sectors) re-encrypted with a new random key where it is (data offset %s), %s at a time with the mapping suspended, each chunk's old ciphertext saved in the journal first\n",
			humanBytes(g.Payload*512), g.Payload, humanBytes(g.Header*512), humanBytes(ph[2].Chunk*512))
	} else {
		gap := g.Header - g.HeaderUsed
		fmt.Fprintf(w, "  data:          %s (%d sectors) re-encrypted with a new random key, moving %s toward the start of the disk (data offset %s -> %s)\n",
			humanBytes(g.Payload*512), g.Payload, humanBytes(gap*512), humanBytes(g.Header*512), humanBytes(g.HeaderUsed*512))
	}
	if note := convert.KeptKeyslotsNote(ep.Header); note != "" {
		fmt.Fprintf(w, "  passphrases:   %s\n", note)
	}
	if note := convert.OtherKeyslotsNote(ep.Header); note != "" {
		fmt.Fprintf(w, "  keyslots:      %s\n", note)
	}
	printJournal(w, ep, "")
	printPhases(w, s)
}

func (a *app) printPlainRekeyPlan(ep *convert.EncryptPlan) {
	s, g := ep.Spec, ep.Spec.Forward.Geometry
	w := a.stdout
	old, _, _ := g.Phys(convert.Backing{Dev: convert.OldID}, 0, 0)
	iv := ""
	if s.OldCrypt.IVOffset > 0 {
		iv = fmt.Sprintf(", IVs from %d", s.OldCrypt.IVOffset)
	}
	if s.TCrypt {
		fmt.Fprintf(w, "Plan: convert TrueCrypt/VeraCrypt volume %s (%s, data at sector %d%s), open as /dev/mapper/%s, to LUKS2, online\n",
			s.Disk.Path, s.OldCrypt.Cipher, old, iv, s.Name)
		printVGAndCipher(w, s)
		fmt.Fprintf(w, "  data:          %s (%d sectors) re-encrypted under a new random key and moved to sector 0 (over the TrueCrypt headers), %s at a time through a dm mirror\n",
			humanBytes(g.Payload*512), g.Payload, humanBytes(s.Forward.Phases[1].Chunk*512))
		fmt.Fprintln(w, "  afterwards:    the old backup headers at the end of the disk are zeroed; a hidden volume inside it, if any, does not survive")
	} else {
		fmt.Fprintf(w, "Plan: rekey plain dm-crypt %s (%s, data at sector %d%s), open as /dev/mapper/%s, in place and online\n",
			s.Disk.Path, s.OldCrypt.Cipher, old, iv, s.Name)
		printVGAndCipher(w, s)
		fmt.Fprintf(w, "  data:          %s (%d sectors) rewritten in place under a new random key, %s at a time with the mapping suspended\n",
			humanBytes(g.Payload*512), g.Payload, humanBytes(s.Forward.Phases[1].Chunk*512))
	}
	if s.PlainTo == "luks2" && s.HeaderFile == "" {
		fmt.Fprintf(w, "  new header:    LUKS2 (UUID %s), on %s before the data (sectors 0-%d, unused by the mapping: their contents are overwritten), written when the run ends; the journal keeps it until then; opened by the passphrase given\n",
			s.LUKSUUID, s.Disk.Path, s.Forward.Geometry.DiskSize-s.Forward.Geometry.Payload-1)
	} else if s.PlainTo == "luks2" {
		fmt.Fprintf(w, "  new header:    LUKS2 (UUID %s), detached: written to %s when the run starts, opened by the passphrase given\n", s.LUKSUUID, convert.PlainKeyFile(ep))
	} else {
		fmt.Fprintf(w, "  new key:       written to %s when the run starts\n", convert.PlainKeyFile(ep))
	}
	if s.TCrypt {
		printJournal(w, ep, " (also holds the TrueCrypt header area, for an abort)")
	} else {
		printJournal(w, ep, " (also holds each chunk's old ciphertext while it is rewritten)")
	}
	fmt.Fprintln(w, "  boot:          until the run ends, do not let crypttab open this volume at boot")
	printPhases(w, s)
}

// finishRekey reports a completed rekey.
func (a *app) finishRekey(r *result, s *convert.Spec) {
	r.fromSpec(s)
	if a.quiet || a.json {
		return
	}
	if s.Plain() && s.PlainTo == "luks2" && s.HeaderFile == "" {
		fmt.Fprintf(a.stdout, "\nDone: %s is LUKS2 with a new %d-bit %s key and its header on it (UUID %s); /dev/mapper/%s uses it.\n",
			s.Disk.Path, s.Crypt.KeyBytes*8, s.Crypt.Cipher, s.LUKSUUID, s.Name)
		fmt.Fprintf(a.stdout, "The old key no longer opens the volume. Open it with: cryptsetup open %s %s\nThe crypttab line (replacing the plain one):\n  %s UUID=%s none luks\nBack up the header: cryptsetup luksHeaderBackup %s --header-backup-file FILE\n",
			s.Disk.Path, s.Name, s.Name, s.LUKSUUID, s.Disk.Path)
		return
	}
	if s.Plain() && s.PlainTo == "luks2" {
		fmt.Fprintf(a.stdout, "\nDone: %s is LUKS2 with a new %d-bit %s key; its header is %s (UUID %s); /dev/mapper/%s uses it.\n",
			s.Disk.Path, s.Crypt.KeyBytes*8, s.Crypt.Cipher, s.HeaderFile, s.LUKSUUID, s.Name)
		fmt.Fprintf(a.stdout, "The old key no longer opens the volume. Open it with: cryptsetup open --header %s %s %s\nThe crypttab line:\n  %s %s none luks,header=%s\nKeep a copy of the header: without it the data is lost.\n",
			s.HeaderFile, s.Disk.Path, s.Name, s.Name, s.Disk.Path, s.HeaderFile)
		return
	}
	if s.Plain() {
		off, _, _ := s.Forward.Geometry.Phys(convert.Backing{Dev: convert.NewID}, 0, 0)
		fmt.Fprintf(a.stdout, "\nDone: %s has a new %d-bit %s key; /dev/mapper/%s uses it.\n", s.Disk.Path, s.Crypt.KeyBytes*8, s.Crypt.Cipher, s.Name)
		fmt.Fprintf(a.stdout, "The new key is in %s; the old key and passphrase no longer open the volume. The crypttab line:\n  %s\n",
			s.NewKeyFile, convert.PlainCrypttabLine(s, off))
		return
	}
	fmt.Fprintf(a.stdout, "\nDone: %s has a new %d-bit %s volume key and its data starts %s into the disk; /dev/mapper/%s uses it.\n",
		s.Disk.Path, s.Crypt.KeyBytes*8, s.Crypt.Cipher, humanBytes(s.Forward.Geometry.HeaderUsed*512), s.Name)
	fmt.Fprintf(a.stdout, "Header backups made before now hold the old key: make a new one (cryptsetup luksHeaderBackup) and destroy the old ones.\n")
}

// printVGAndCipher prints a rekey plan's volume group (if any) and its
// cipher and key size, before and after.
func printVGAndCipher(w io.Writer, s *convert.Spec) {
	if s.VG != "" {
		fmt.Fprintf(w, "  volume group:  %s (PV %s)\n", s.VG, s.PVDevice)
	}
	change := "unchanged"
	if s.Crypt != s.OldCrypt {
		change = fmt.Sprintf("changes to %s with a %d-bit key", s.Crypt.Cipher, s.Crypt.KeyBytes*8)
	}
	fmt.Fprintf(w, "  cipher:        %s with a %d-bit key, %d-byte sectors; %s\n", s.OldCrypt.Cipher, s.OldCrypt.KeyBytes*8, s.OldCrypt.SectorSize, change)
}

// printPhases prints a plan's phases, numbered.
func printPhases(w io.Writer, s *convert.Spec) {
	fmt.Fprintln(w, "  phases:")
	for i, ph := range s.Forward.Phases {
		fmt.Fprintf(w, "    %d. %s\n", i+1, convert.DescribePhase(ph))
	}
}

// nameAlsoKeyFiles adds the file's name to an error about further key #N
// (the engine numbers the --also-key-file files, in order).
func nameAlsoKeyFiles(err error, files []string) error {
	for i, f := range files {
		tag := fmt.Sprintf("further key #%d (--also-key-file)", i+1)
		if strings.Contains(err.Error(), tag) {
			return &namedKeyError{err: err, old: tag, new: fmt.Sprintf("--also-key-file %s", f)}
		}
	}
	return err
}

// namedKeyError is err with one phrase of its message replaced; errors.Is
// and errors.As still see err (exit codes, refusals).
type namedKeyError struct {
	err      error
	old, new string
}

func (e *namedKeyError) Error() string { return strings.Replace(e.err.Error(), e.old, e.new, 1) }
func (e *namedKeyError) Unwrap() error { return e.err }
