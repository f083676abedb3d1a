package main

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/luks"
)

// encryptOptions are the flags of `dmconvert encrypt`, with cryptsetup's
// names where they overlap.
type encryptOptions struct {
	luksType      string
	name          string
	cipher        string
	keySize       int // bits
	sectorSize    int
	headerSize    sizeFlag
	key           keyOptions
	pbkdf         string
	pbkdfMemory   uint32
	pbkdfParallel uint32
	pbkdfIter     uint32
	iterTime      uint32 // ms
	hash          string
	label         string
	subsystem     string
	uuid          string
	journal       string
	chunkSize     sizeFlag
	regionSize    sizeFlag
	dryRun        bool
	yes           bool
	batch         bool
	crypttab      bool
	crypttabFile  string
	shrinkPV      bool
}

func (a *app) encryptCommand(mark markFunc) *cobra.Command {
	return a.encryptCommandFor(&encryptOptions{}, mark)
}

func (a *app) encryptCommandFor(o *encryptOptions, mark markFunc) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "encrypt DEVICE",
		Short: "encrypt an LVM physical volume in place while its logical volumes are in use",
		Long: `Encrypt DEVICE, a disk or partition that is an LVM physical volume whose
logical volumes may be active and mounted, into LUKS in place, online.

The LUKS header takes --header-size bytes at the start of the disk and the
same amount is needed after the physical volume as working space: the
physical volume must end at least two header sizes before the end of the
disk (see --shrink-pv). The result is what 'cryptsetup luksFormat' and
'cryptsetup open' would have made, with the volume group on
/dev/mapper/NAME.`,
		Args: exactArgs(1),
		RunE: mark(func(cmd *cobra.Command, args []string) error { return a.runEncrypt(cmd.Context(), o, args) }),
	}
	f := cmd.Flags()
	f.StringVar(&o.luksType, "type", "luks2", "LUKS format: luks2 or luks1")
	f.StringVar(&o.name, "name", "", "name of the final mapping (default <basename of DEVICE>_crypt)")
	f.StringVarP(&o.cipher, "cipher", "c", luks.DefaultCipher, "data cipher")
	f.IntVarP(&o.keySize, "key-size", "s", 0, "volume key size in bits (default 512 for XTS, 256 otherwise)")
	f.IntVar(&o.sectorSize, "sector-size", 0, "encryption sector size in bytes (default and only allowed value: the device's logical block size)")
	f.Var(&o.headerSize, "header-size", "LUKS header size, bytes or with a K/M/G suffix (default 16M for LUKS2, 2M for LUKS1)")
	o.key.register(f)
	f.StringVar(&o.pbkdf, "pbkdf", "", "passphrase KDF: argon2id, argon2i or pbkdf2 (default argon2id for LUKS2, pbkdf2 for LUKS1)")
	f.Uint32Var(&o.pbkdfMemory, "pbkdf-memory", 0, "argon2 memory cost in KiB")
	f.Uint32Var(&o.pbkdfParallel, "pbkdf-parallel", 0, "argon2 parallel threads")
	f.Uint32Var(&o.pbkdfIter, "pbkdf-force-iterations", 0, "KDF iterations (pbkdf2) or time cost (argon2), skipping the benchmark")
	f.Uint32VarP(&o.iterTime, "iter-time", "i", 0, "KDF benchmark target in milliseconds (default 2000)")
	f.StringVar(&o.hash, "hash", "", "hash for pbkdf2, the AF splitter and the key digest (default sha256)")
	f.StringVar(&o.label, "label", "", "LUKS2 label")
	f.StringVar(&o.subsystem, "subsystem", "", "LUKS2 subsystem")
	f.StringVar(&o.uuid, "uuid", "", "LUKS UUID (default random)")
	f.StringVar(&o.journal, "journal", "", "journal file (default "+convert.DefaultJournalDir+"/<PV UUID>.journal); must not live on DEVICE")
	f.Var(&o.chunkSize, "chunk-size", "bytes copied per step, with K/M/G suffix (default and maximum: the header size; an encrypt moves the disk's head out in one step of the header size)")
	f.Var(&o.regionSize, "region-size", fmt.Sprintf("dm-mirror region size, a power of two (default %s)", humanBytes(convert.DefaultRegionSize*512)))
	f.BoolVar(&o.dryRun, "dry-run", false, "print the plan and change nothing (no passphrase needed)")
	f.BoolVar(&o.yes, "yes", false, "do not ask for confirmation")
	f.BoolVarP(&o.batch, "batch-mode", "q", false, "do not ask for confirmation (as cryptsetup's --batch-mode)")
	f.BoolVar(&o.crypttab, "crypttab", false, "append the crypttab line to /etc/crypttab (or --crypttab-file)")
	f.StringVar(&o.crypttabFile, "crypttab-file", "", "crypttab file to append to (implies --crypttab)")
	f.BoolVar(&o.shrinkPV, "shrink-pv", false, "shrink the physical volume first when its last extents are free and it is too large")
	return cmd
}

var (
	uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
)

// encryptConfig is the validated form of encryptOptions.
type encryptConfig struct {
	luks          luks.Options // everything but the sector size
	keyBytes      int
	headerSectors convert.Sectors
	chunk         convert.Sectors
	region        convert.Sectors
	crypttab      string // file to append to, "" for none
}

// validate checks every flag before anything else happens; every error
// is a usage error (exit 2).
func (o *encryptOptions) validate(defaultCrypttab string) (*encryptConfig, error) {
	c := &encryptConfig{}
	var version int
	switch strings.ToLower(o.luksType) {
	case "luks2", "luks":
		version = 2
	case "luks1":
		version = 1
	default:
		return nil, usagef("--type %q: use luks2 or luks1", o.luksType)
	}
	if err := o.key.validate(); err != nil {
		return nil, err
	}
	cipher := o.cipher
	if o.keySize < 0 || o.keySize%8 != 0 {
		return nil, usagef("--key-size %d is not a whole number of bytes in bits", o.keySize)
	}
	c.keyBytes = o.keySize / 8
	if c.keyBytes == 0 {
		c.keyBytes = luks.DefaultKeySize(cipher)
	}
	if err := luks.ValidateCipher(cipher, c.keyBytes); err != nil {
		return nil, usagef("--cipher %s with a %d-bit key: %v", cipher, c.keyBytes*8, err)
	}
	if o.sectorSize != 0 {
		ss := o.sectorSize
		if ss < 512 || ss > 4096 || ss&(ss-1) != 0 {
			return nil, usagef("--sector-size %d is not a power of two between 512 and 4096", ss)
		}
		if version == 1 && ss != 512 {
			return nil, usagef("--sector-size %d: LUKS1 supports only 512-byte sectors (use --type luks2)", ss)
		}
	}
	hs := uint64(luks.DefaultLUKS2HeaderSize)
	if version == 1 {
		hs = luks.DefaultLUKS1HeaderSize
	}
	if o.headerSize.set {
		hs = o.headerSize.v
	}
	if hs == 0 || hs%4096 != 0 {
		return nil, usagef("--header-size %d is not a non-zero multiple of 4096 bytes", hs)
	}
	if o.sectorSize != 0 && hs%uint64(o.sectorSize) != 0 {
		return nil, usagef("--header-size %d is not a multiple of the sector size %d", hs, o.sectorSize)
	}
	minHS := uint64(luks.MinHeaderSize(version, c.keyBytes, 0))
	if version == 1 {
		// The last 4 KiB hold dmconvert's checkpoint records.
		minHS += 4096
	}
	if hs < minHS {
		return nil, usagef("--header-size %d is too small for a LUKS%d header with a %d-bit key (at least %d bytes)", hs, version, c.keyBytes*8, minHS)
	}
	c.headerSectors = convert.Sectors(hs / 512)

	kdf, err := kdfFlags{o.pbkdf, o.pbkdfMemory, o.pbkdfParallel, o.pbkdfIter, o.iterTime, o.hash}.build(version)
	if err != nil {
		return nil, err
	}
	if version == 1 && (o.label != "" || o.subsystem != "") {
		return nil, usagef("--label and --subsystem need LUKS2")
	}
	if len(o.label) > 47 || len(o.subsystem) > 47 {
		return nil, usagef("--label and --subsystem take at most 47 bytes")
	}
	if o.uuid != "" && !uuidRE.MatchString(o.uuid) {
		return nil, usagef("--uuid %q is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)", o.uuid)
	}
	if o.name != "" && (strings.ContainsAny(o.name, "/ \t\n") || o.name == "." || o.name == "..") {
		return nil, usagef("--name %q is not a valid mapping name", o.name)
	}
	c.luks = luks.Options{
		Version: version, Cipher: cipher, HeaderSize: int64(hs), Hash: strings.ToLower(o.hash),
		PBKDF: kdf, UUID: strings.ToLower(o.uuid), Label: o.label, Subsystem: o.subsystem,
	}
	if o.chunkSize.set {
		cs := o.chunkSize.v
		if cs == 0 || cs%4096 != 0 {
			return nil, usagef("--chunk-size %d is not a non-zero multiple of 4096 bytes", cs)
		}
		if cs > hs {
			return nil, usagef("--chunk-size %d is larger than the header size %d (a chunk never exceeds the header size)", cs, hs)
		}
		c.chunk = convert.Sectors(cs / 512)
	}
	c.region = convert.DefaultRegionSize
	if o.regionSize.set {
		rs := o.regionSize.v
		if rs < 4096 || rs&(rs-1) != 0 {
			return nil, usagef("--region-size %d is not a power of two of at least 4096 bytes", rs)
		}
		c.region = convert.Sectors(rs / 512)
	}
	if o.crypttab || o.crypttabFile != "" {
		c.crypttab = o.crypttabFile
		if c.crypttab == "" {
			c.crypttab = defaultCrypttab
		}
	}
	return c, nil
}

// cheapKDF is the cheapest setting of the chosen KDF type: for --dry-run
// and the preview shown before the confirmation, whose headers are never
// written.
func cheapKDF(k luks.PBKDF) luks.PBKDF {
	if k.Type == luks.KDFPBKDF2 {
		return luks.PBKDF{Type: k.Type, Hash: k.Hash, Iterations: luks.MinPBKDF2Iterations}
	}
	return luks.PBKDF{Type: k.Type, Iterations: luks.MinArgon2Time, MemoryKiB: luks.MinArgon2Memory, Parallel: 1}
}

func (a *app) engine(region convert.Sectors) (*convert.Engine, func() error, error) {
	e, closeFn, err := a.newEngine()
	if err != nil {
		return nil, nil, err
	}
	if region != 0 {
		e.RegionSize = region
	}
	return e, closeFn, nil
}

// runEncrypt is `dmconvert encrypt`.
func (a *app) runEncrypt(ctx context.Context, o *encryptOptions, args []string) (err error) {
	res := &result{Command: "encrypt"}
	defer func() { a.emitResult(res, err) }()
	if len(args) != 1 {
		return usagef("encrypt takes one DEVICE")
	}
	dev := args[0]
	res.Device = dev
	cfg, err := o.validate(a.crypttab)
	if err != nil {
		return err
	}
	if !o.dryRun && a.reexec != nil {
		if err := a.reexec(); err != nil {
			return fmt.Errorf("re-executing dmconvert from memory: %w", err)
		}
	}
	e, closeEngine, err := a.engine(cfg.region)
	if err != nil {
		return err
	}
	defer closeEngine()
	eo := convert.EncryptOptions{
		Device: dev, Name: o.name, Journal: o.journal, HeaderSectors: cfg.headerSectors,
		SectorSize: uint32(o.sectorSize), KeyBytes: cfg.keyBytes, Chunk: cfg.chunk, ShrinkPV: o.shrinkPV,
	}
	if cfg.luks.UUID == "" {
		// One UUID for the preview and the real header.
		if cfg.luks.UUID, err = newUUID(); err != nil {
			return err
		}
	}
	// plan makes a plan; cheap plans get a throwaway passphrase and the
	// cheapest KDF settings (their header is never written).
	plan := func(pass []byte, cheap bool) (*convert.EncryptPlan, error) {
		lo := cfg.luks
		if cheap {
			lo.PBKDF = cheapKDF(lo.PBKDF)
			p, err := randomPassphrase()
			if err != nil {
				return nil, err
			}
			defer luks.WipeBytes(p)
			pass = p
		}
		eo := eo
		eo.NewHeader = headerFactory(dev, lo, pass)
		return e.PlanEncrypt(ctx, eo)
	}

	if o.dryRun {
		ep, err := plan(nil, true)
		if err != nil {
			return err
		}
		defer ep.Wipe()
		a.takePlan(res, ep)
		res.Outcome = "planned"
		res.Plan = ep.Spec
		if !a.json && !a.quiet {
			a.printPlan(ep, cfg)
			fmt.Fprintln(a.stdout, "Dry run: nothing was changed.")
		}
		return nil
	}

	if !o.yes && !o.batch {
		ep, err := plan(nil, true)
		if err != nil {
			return err
		}
		ep.Wipe()
		if !a.json && !a.quiet {
			a.printPlan(ep, cfg)
		}
		if err := a.confirm(dev); err != nil {
			return err
		}
	}
	pass, err := a.readNewKey(o.key, dev)
	if err != nil {
		return err
	}
	defer luks.WipeBytes(pass)
	ep, err := plan(pass, false)
	if err != nil {
		return err
	}
	defer ep.Wipe()
	a.takePlan(res, ep)
	if (o.yes || o.batch) && !a.json && !a.quiet {
		a.printPlan(ep, cfg)
	}

	// The plan executed is always made after the prompt, if any.
	if err := a.execute(ctx, e, ep, true); err != nil {
		return err
	}
	res.Outcome = "done"
	a.finishEncrypt(res, ep.Spec, cfg.crypttab)
	return nil
}

// confirm asks the user to type YES in capitals, as cryptsetup does.
func (a *app) confirm(dev string) error { return a.confirmVerb("encrypt", dev) }

// readLine reads one line byte by byte, so nothing after it is consumed
// (a passphrase may follow on the same input).
func readLine(f interface{ Read([]byte) (int, error) }) (string, error) {
	var b []byte
	one := make([]byte, 1)
	for {
		n, err := f.Read(one)
		if n == 1 {
			if one[0] == '\n' {
				return strings.TrimSuffix(string(b), "\r"), nil
			}
			b = append(b, one[0])
		}
		if err != nil {
			if len(b) > 0 {
				return string(b), nil
			}
			return "", err
		}
	}
}

// noteKeptState prepares what to tell the user after a failed or
// interrupted run, when its journal holds the state (printed after the
// error).
func (a *app) noteKeptState(journalPath string, runErr error) {
	if a.quiet || a.json || journalPath == "" {
		return
	}
	ri, err := convert.InspectJournal(journalPath, a.statusLockTimeout)
	if err != nil || ri.Finished() {
		return
	}
	what := "failed; its state is kept"
	if errors.Is(runErr, convert.ErrInterrupted) {
		what = "stopped at a safe point; its state is"
	}
	a.hint = fmt.Sprintf("The conversion %s in %s (%.1f%% copied).\n"+
		"Continue with:   dmconvert resume %s\n"+
		"or undo it with: dmconvert abort %s\n",
		what, ri.Journal, percent(ri.DoneBytes, ri.TotalBytes), ri.Device, ri.Device)
}

func percent(done, total uint64) float64 {
	if total == 0 {
		return 100
	}
	return 100 * float64(done) / float64(total)
}

// kdfFlags are the passphrase KDF flags of a new header.
type kdfFlags struct {
	pbkdf                            string
	pbkdfMemory, pbkdfParallel, iter uint32
	iterTime                         uint32 // ms
	hash                             string
}

// build checks the flags and returns the KDF of a new LUKS<version>
// keyslot.
func (o kdfFlags) build(version int) (luks.PBKDF, error) {
	kdf := luks.PBKDF{Type: strings.ToLower(o.pbkdf), Iterations: o.iter, MemoryKiB: o.pbkdfMemory, Parallel: o.pbkdfParallel,
		IterTime: time.Duration(o.iterTime) * time.Millisecond}
	if kdf.Type == "" {
		kdf.Type = luks.KDFArgon2id
		if version == 1 {
			kdf.Type = luks.KDFPBKDF2
		}
	}
	switch kdf.Type {
	case luks.KDFPBKDF2:
		if o.pbkdfMemory != 0 || o.pbkdfParallel != 0 {
			return kdf, usagef("--pbkdf-memory and --pbkdf-parallel apply to argon2 only")
		}
		if o.iter != 0 && o.iter < luks.MinPBKDF2Iterations {
			return kdf, usagef("--pbkdf-force-iterations %d is below the pbkdf2 minimum %d", o.iter, luks.MinPBKDF2Iterations)
		}
		kdf.Hash = strings.ToLower(o.hash)
	case luks.KDFArgon2i, luks.KDFArgon2id:
		if version == 1 {
			return kdf, usagef("--pbkdf %s: LUKS1 supports only pbkdf2", kdf.Type)
		}
		if o.pbkdfMemory != 0 && (o.pbkdfMemory < luks.MinArgon2Memory || o.pbkdfMemory > luks.MaxArgon2Memory) {
			return kdf, usagef("--pbkdf-memory %d KiB is outside %d..%d", o.pbkdfMemory, luks.MinArgon2Memory, luks.MaxArgon2Memory)
		}
		if o.pbkdfParallel > luks.MaxArgon2Parallel {
			return kdf, usagef("--pbkdf-parallel %d is above the maximum %d", o.pbkdfParallel, luks.MaxArgon2Parallel)
		}
		if o.iter != 0 && o.iter < luks.MinArgon2Time {
			return kdf, usagef("--pbkdf-force-iterations %d is below the %s minimum %d", o.iter, kdf.Type, luks.MinArgon2Time)
		}
	default:
		return kdf, usagef("--pbkdf %q: use argon2id, argon2i or pbkdf2", o.pbkdf)
	}
	return kdf, nil
}
