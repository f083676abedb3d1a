package dmtable

import (
	"fmt"
	"strconv"
	"strings"
)

// Cipher is a dm-crypt cipher specification, in either form the kernel
// accepts:
//
//	cipher[:keycount]-chainmode-ivmode[:ivopts]   e.g. aes-xts-plain64, aes-cbc-essiv:sha256
//	capi:cipher_api_spec-ivmode[:ivopts]           e.g. capi:xts(aes)-plain64
//
// It is a string so that building a table stays easy
// (Crypt{Cipher: "aes-xts-plain64", ...}); Spec parses it.
type Cipher string

// CipherSpec is a parsed Cipher. Absent parts are empty (or zero), so that
// String gives back exactly the parsed text.
type CipherSpec struct {
	// Capi is true for the "capi:" form; API is then the crypto API
	// specification (e.g. "xts(aes)") and Cipher, KeyCount and ChainMode
	// are unused.
	Capi bool
	API  string

	Cipher    string // e.g. "aes"
	KeyCount  uint32 // 0 when not given
	ChainMode string // e.g. "xts"; empty when not given

	IVMode string // e.g. "plain64", "essiv"; empty when not given
	IVOpts string // e.g. "sha256"; empty when not given
}

// Spec parses the cipher specification the way the kernel splits it.
func (c Cipher) Spec() (CipherSpec, error) {
	s := string(c)
	if s == "" {
		return CipherSpec{}, fmt.Errorf("empty cipher specification")
	}
	if strings.ContainsAny(s, " \t\n\x00") {
		return CipherSpec{}, fmt.Errorf("cipher specification contains white space")
	}
	var sp CipherSpec
	if rest, ok := strings.CutPrefix(s, "capi:"); ok {
		// The kernel cuts the IV options at the last ':' and then the IV
		// mode at the last '-': the API spec itself may hold '-'.
		sp.Capi = true
		if i := strings.LastIndexByte(rest, ':'); i >= 0 {
			sp.IVOpts = rest[i+1:]
			rest = rest[:i]
			if sp.IVOpts == "" {
				return CipherSpec{}, fmt.Errorf("cipher %q: empty IV options", s)
			}
		}
		if i := strings.LastIndexByte(rest, '-'); i >= 0 {
			sp.IVMode = rest[i+1:]
			rest = rest[:i]
			if sp.IVMode == "" {
				return CipherSpec{}, fmt.Errorf("cipher %q: empty IV mode", s)
			}
		}
		if rest == "" {
			return CipherSpec{}, fmt.Errorf("cipher %q: empty crypto API specification", s)
		}
		if sp.IVOpts != "" && sp.IVMode == "" {
			return CipherSpec{}, fmt.Errorf("cipher %q: IV options without IV mode", s)
		}
		sp.API = rest
		return sp, nil
	}
	// Old form: cipher[:keycount]-chainmode-ivmode[:ivopts].
	head, tail, hasTail := strings.Cut(s, "-")
	name, count, hasCount := strings.Cut(head, ":")
	if name == "" {
		return CipherSpec{}, fmt.Errorf("cipher %q: empty cipher name", s)
	}
	sp.Cipher = name
	if hasCount {
		n, err := parseUint(count, 32)
		if err != nil || n == 0 {
			return CipherSpec{}, fmt.Errorf("cipher %q: bad key count", s)
		}
		sp.KeyCount = uint32(n)
	}
	if !hasTail {
		return sp, nil
	}
	chain, iv, hasIV := strings.Cut(tail, "-")
	if chain == "" {
		return CipherSpec{}, fmt.Errorf("cipher %q: empty chaining mode", s)
	}
	sp.ChainMode = chain
	if !hasIV {
		return sp, nil
	}
	mode, opts, hasOpts := strings.Cut(iv, ":")
	if mode == "" {
		return CipherSpec{}, fmt.Errorf("cipher %q: empty IV mode", s)
	}
	sp.IVMode = mode
	if hasOpts {
		if opts == "" {
			return CipherSpec{}, fmt.Errorf("cipher %q: empty IV options", s)
		}
		sp.IVOpts = opts
	}
	return sp, nil
}

// String prints the specification in the form it was parsed from.
func (sp CipherSpec) String() string {
	var b strings.Builder
	if sp.Capi {
		b.WriteString("capi:")
		b.WriteString(sp.API)
		if sp.IVMode != "" {
			b.WriteString("-" + sp.IVMode)
		}
		if sp.IVOpts != "" {
			b.WriteString(":" + sp.IVOpts)
		}
		return b.String()
	}
	b.WriteString(sp.Cipher)
	if sp.KeyCount != 0 {
		b.WriteString(":" + strconv.FormatUint(uint64(sp.KeyCount), 10))
	}
	if sp.ChainMode != "" {
		b.WriteString("-" + sp.ChainMode)
		if sp.IVMode != "" {
			b.WriteString("-" + sp.IVMode)
			if sp.IVOpts != "" {
				b.WriteString(":" + sp.IVOpts)
			}
		}
	}
	return b.String()
}

// Crypt encrypts the target onto Dev starting at Offset.
//
// Table form (field order as the kernel prints it):
//
//	<cipher> <key> <iv_offset> <dev> <offset> [<#opt> <opt>...]
//
// e.g. "aes-xts-plain64 <128 hex digits> 0 254:0 32768 1 allow_discards".
// Optional parameters print in the kernel's order: allow_discards
// same_cpu_crypt submit_from_crypt_cpus no_read_workqueue
// no_write_workqueue integrity:<bytes>:<type> sector_size:<n>
// iv_large_sectors, then Extra.
//
// String masks the key; Payload carries it (see Key).
type Crypt struct {
	Cipher   Cipher
	Key      Key
	IVOffset Sectors
	Dev      DevRef
	Offset   Sectors

	AllowDiscards       bool
	SameCPUCrypt        bool
	SubmitFromCryptCPUs bool
	NoReadWorkqueue     bool
	NoWriteWorkqueue    bool
	// IntegrityTagSize and IntegrityType are "integrity:<bytes>:<type>"
	// (AEAD or authenticated modes over dm-integrity); zero when unused.
	IntegrityTagSize uint32
	IntegrityType    string
	// SectorSize is the encryption sector size in bytes; 0 (or 512) is the
	// default 512 and is not printed.
	SectorSize     uint32
	IVLargeSectors bool
	// Extra holds optional parameters this package does not know, verbatim.
	Extra []string
}

func parseCrypt(args []string) (*Crypt, error) {
	if len(args) < 5 {
		return nil, fmt.Errorf("crypt: want <cipher> <key> <iv_offset> <dev> <offset> [<#opt> <opt>...], got %d fields", len(args))
	}
	c := &Crypt{Cipher: Cipher(args[0])}
	if _, err := c.Cipher.Spec(); err != nil {
		return nil, fmt.Errorf("crypt: %w", err)
	}
	k, err := ParseKey(args[1])
	if err != nil {
		return nil, fmt.Errorf("crypt: %w", err)
	}
	c.Key = k
	if c.IVOffset, err = parseSectors("iv offset", args[2]); err != nil {
		return nil, fmt.Errorf("crypt: %w", err)
	}
	if c.Dev, err = ParseDevRef(args[3]); err != nil {
		return nil, fmt.Errorf("crypt: %w", err)
	}
	if c.Offset, err = parseSectors("offset", args[4]); err != nil {
		return nil, fmt.Errorf("crypt: %w", err)
	}
	rest := args[5:]
	if len(rest) == 0 {
		return c, nil
	}
	n, err := parseUint(rest[0], 32)
	if err != nil {
		return nil, fmt.Errorf("crypt: optional parameter count %q: %w", rest[0], err)
	}
	if uint64(len(rest)-1) != n {
		return nil, fmt.Errorf("crypt: %d optional parameters announced, %d given", n, len(rest)-1)
	}
	for _, o := range rest[1:] {
		if err := c.setOption(o); err != nil {
			return nil, fmt.Errorf("crypt: %w", err)
		}
	}
	return c, nil
}

func (c *Crypt) setOption(o string) error {
	switch {
	case o == "allow_discards":
		c.AllowDiscards = true
	case o == "same_cpu_crypt":
		c.SameCPUCrypt = true
	case o == "submit_from_crypt_cpus":
		c.SubmitFromCryptCPUs = true
	case o == "no_read_workqueue":
		c.NoReadWorkqueue = true
	case o == "no_write_workqueue":
		c.NoWriteWorkqueue = true
	case o == "iv_large_sectors":
		c.IVLargeSectors = true
	case strings.HasPrefix(o, "integrity:"):
		size, typ, ok := strings.Cut(strings.TrimPrefix(o, "integrity:"), ":")
		n, err := parseUint(size, 32)
		if !ok || err != nil || n == 0 || typ == "" {
			return fmt.Errorf("bad option %q: want integrity:<bytes>:<type>", o)
		}
		c.IntegrityTagSize, c.IntegrityType = uint32(n), typ
	case strings.HasPrefix(o, "sector_size:"):
		n, err := parseUint(strings.TrimPrefix(o, "sector_size:"), 32)
		if err != nil || n == 0 {
			return fmt.Errorf("bad option %q: want sector_size:<bytes>", o)
		}
		c.SectorSize = uint32(n)
	default:
		c.Extra = append(c.Extra, o)
	}
	return nil
}

func (*Crypt) Type() string { return "crypt" }

func (c *Crypt) options() []string {
	var o []string
	if c.AllowDiscards {
		o = append(o, "allow_discards")
	}
	if c.SameCPUCrypt {
		o = append(o, "same_cpu_crypt")
	}
	if c.SubmitFromCryptCPUs {
		o = append(o, "submit_from_crypt_cpus")
	}
	if c.NoReadWorkqueue {
		o = append(o, "no_read_workqueue")
	}
	if c.NoWriteWorkqueue {
		o = append(o, "no_write_workqueue")
	}
	if c.IntegrityTagSize != 0 {
		o = append(o, "integrity:"+strconv.FormatUint(uint64(c.IntegrityTagSize), 10)+":"+c.IntegrityType)
	}
	if c.SectorSize != 0 && c.SectorSize != SectorSize {
		o = append(o, "sector_size:"+strconv.FormatUint(uint64(c.SectorSize), 10))
	}
	if c.IVLargeSectors {
		o = append(o, "iv_large_sectors")
	}
	return append(o, c.Extra...)
}

func (c *Crypt) format(key string) string {
	var b strings.Builder
	b.WriteString(string(c.Cipher))
	b.WriteByte(' ')
	b.WriteString(key)
	b.WriteByte(' ')
	b.WriteString(c.IVOffset.String())
	b.WriteByte(' ')
	b.WriteString(c.Dev.String())
	b.WriteByte(' ')
	b.WriteString(c.Offset.String())
	if o := c.options(); len(o) > 0 {
		b.WriteByte(' ')
		b.WriteString(strconv.Itoa(len(o)))
		for _, s := range o {
			b.WriteByte(' ')
			b.WriteString(s)
		}
	}
	return b.String()
}

// String prints the parameters with the key masked.
func (c *Crypt) String() string { return c.format(c.Key.String()) }

// GoString keeps %#v from printing the key material through reflection
// (Key masks itself too; this is belt and braces).
func (c *Crypt) GoString() string { return "&dmtable.Crypt{" + c.String() + "}" }

// Payload prints the parameters with the key. Only the Client should call it.
func (c *Crypt) Payload() string { return c.format(c.Key.Payload()) }

func (c *Crypt) Devices() []DevRef { return []DevRef{c.Dev} }

func (c *Crypt) MapDevices(f func(DevRef) DevRef) Params {
	d := *c
	d.Dev = f(c.Dev)
	d.Extra = append([]string(nil), c.Extra...)
	return &d
}

// Equal compares two crypt parameter sets; keys in constant time.
func (c *Crypt) Equal(o *Crypt) bool {
	return c.String() == o.String() && c.Key.Equal(o.Key)
}

func (c *Crypt) Validate(length Sectors) error {
	if _, err := c.Cipher.Spec(); err != nil {
		return fmt.Errorf("crypt: %w", err)
	}
	if c.Dev.IsZero() {
		return fmt.Errorf("crypt: no device")
	}
	if c.Key.IsKeyring() {
		typ, desc, _ := c.Key.Keyring()
		switch typ {
		case "logon", "user", "encrypted", "trusted":
		default:
			return fmt.Errorf("crypt: keyring key type %q is not logon, user, encrypted or trusted", typ)
		}
		if strings.ContainsAny(desc, " \t\n\x00") {
			return fmt.Errorf("crypt: keyring key description contains white space")
		}
	}
	if c.Offset+length < c.Offset {
		return fmt.Errorf("crypt: offset %d + length %d overflows", c.Offset, length)
	}
	if ss := c.SectorSize; ss != 0 && ss != SectorSize {
		if ss < 512 || ss > 4096 || ss&(ss-1) != 0 {
			return fmt.Errorf("crypt: sector size %d is not a power of two between 512 and 4096", ss)
		}
		per := Sectors(ss / SectorSize)
		if length%per != 0 {
			return fmt.Errorf("crypt: length %d is not a multiple of the %d-byte encryption sector", length, ss)
		}
		if c.Offset%per != 0 {
			return fmt.Errorf("crypt: offset %d is not a multiple of the %d-byte encryption sector", c.Offset, ss)
		}
	}
	if c.IntegrityTagSize != 0 && (c.IntegrityType == "" || strings.ContainsAny(c.IntegrityType, " \t\n\x00")) {
		return fmt.Errorf("crypt: integrity type %q is empty or contains white space", c.IntegrityType)
	}
	for _, e := range c.Extra {
		if e == "" || strings.ContainsAny(e, " \t\n\x00") {
			return fmt.Errorf("crypt: optional parameter %q is empty or contains white space", e)
		}
	}
	return nil
}
