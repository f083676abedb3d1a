package convert

import (
	"fmt"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
)

// CryptSpec is how a crypt mapping of the run encrypts (everything but the
// key, which never leaves memory).
type CryptSpec struct {
	Cipher     string `json:"cipher"`
	KeyBytes   int    `json:"key_bytes"`
	SectorSize uint32 `json:"sector_size"`
	// IVLargeSectors: IVs count sector_size units (LUKS2 with sectors
	// larger than 512 bytes, as cryptsetup activates it).
	IVLargeSectors bool `json:"iv_large_sectors,omitempty"`
	// IVOffset is the IV of the mapping's first sector (cryptsetup's
	// --skip; plain mappings only: LUKS data starts at IV 0).
	IVOffset Sectors `json:"iv_offset,omitempty"`
	// Opts are the source mapping's dm-crypt flags (cryptsetup's
	// --allow-discards and --perf-* options: allow_discards,
	// same_cpu_crypt, submit_from_crypt_cpus, no_read_workqueue,
	// no_write_workqueue; space-separated, so the spec stays
	// comparable), kept by every crypt table of the run and by the final
	// one, so the mapping behaves as it did.
	Opts string `json:"opts,omitempty"`
}

// cryptOpts lists the flags of c that CryptSpec.Opts keeps.
func cryptOpts(c *dmtable.Crypt) string {
	var out []string
	for _, f := range []struct {
		on   bool
		name string
	}{
		{c.AllowDiscards, "allow_discards"},
		{c.SameCPUCrypt, "same_cpu_crypt"},
		{c.SubmitFromCryptCPUs, "submit_from_crypt_cpus"},
		{c.NoReadWorkqueue, "no_read_workqueue"},
		{c.NoWriteWorkqueue, "no_write_workqueue"},
	} {
		if f.on {
			out = append(out, f.name)
		}
	}
	return strings.Join(out, " ")
}

// cryptTarget builds "<start> <len> crypt <cipher> <key> <iv> <dev> <off>
// [<#opts> sector_size:N iv_large_sectors]"; <iv> is cs.IVOffset +
// ivOffset.
func cryptTarget(start, length Sectors, cs CryptSpec, key dmtable.Key, ivOffset Sectors, dev dmtable.Dev, offset Sectors) dmtable.Target {
	c := &dmtable.Crypt{
		Cipher:   dmtable.Cipher(cs.Cipher),
		Key:      key,
		IVOffset: dmtable.Sectors(cs.IVOffset + ivOffset),
		Dev:      dev.Ref(),
		Offset:   dmtable.Sectors(offset),
	}
	if cs.SectorSize > 512 {
		c.SectorSize = cs.SectorSize
		c.IVLargeSectors = cs.IVLargeSectors
	}
	for _, o := range strings.Fields(cs.Opts) {
		switch o {
		case "allow_discards":
			c.AllowDiscards = true
		case "same_cpu_crypt":
			c.SameCPUCrypt = true
		case "submit_from_crypt_cpus":
			c.SubmitFromCryptCPUs = true
		case "no_read_workqueue":
			c.NoReadWorkqueue = true
		case "no_write_workqueue":
			c.NoWriteWorkqueue = true
		}
	}
	return dmtable.Target{Start: dmtable.Sectors(start), Length: dmtable.Sectors(length), Params: c}
}

func linearTarget(start, length Sectors, dev dmtable.Dev, offset Sectors) dmtable.Target {
	return dmtable.Target{
		Start: dmtable.Sectors(start), Length: dmtable.Sectors(length),
		Params: &dmtable.Linear{Dev: dev.Ref(), Offset: dmtable.Sectors(offset)},
	}
}

// regionFor picks the mirror region size for a chunk: the configured size,
// lowered to the largest power of two that fits the chunk (the kernel
// refuses a region larger than the target), never below 8 sectors.
func regionFor(want, length Sectors) Sectors {
	if want < 8 {
		want = 8
	}
	r := Sectors(8)
	for r*2 <= want && r*2 <= length {
		r *= 2
	}
	return r
}

// chunkRef names the chunk a table mirrors.
type chunkRef struct {
	start, end Sectors
	from, to   Backing
}

// tableFor is F's table at state st: every extent of the layout as a
// linear target, and the chunk (if any) as
//
//	<s> <len> mirror core 1 <region> 2 <from dev> <off> <to dev> <off>
//
// whose first leg (the source) is the one the kernel reads and copies from.
func (p *Plan) tableFor(st State, ch *chunkRef, devs map[BackingID]dmtable.Dev, region Sectors) (dmtable.Table, error) {
	layout := p.Layout(st)
	var t dmtable.Table
	emit := func(s, e Sectors, b Backing) error {
		if s >= e {
			return nil
		}
		d, ok := devs[b.Dev]
		if !ok {
			return fmt.Errorf("no device for backing %q", b.Dev)
		}
		off := int64(s) + b.Delta
		if off < 0 {
			return fmt.Errorf("negative offset for F[%d,%d) on %v", s, e, b)
		}
		t = append(t, linearTarget(s, e-s, d, Sectors(off)))
		return nil
	}
	for _, x := range layout {
		if ch == nil || x.End <= ch.start || x.Start >= ch.end {
			if err := emit(x.Start, x.End, x.On); err != nil {
				return nil, err
			}
			continue
		}
		if x.On != ch.from {
			return nil, fmt.Errorf("chunk [%d,%d) is on %v, not on %v", ch.start, ch.end, x.On, ch.from)
		}
		if err := emit(x.Start, ch.start, x.On); err != nil {
			return nil, err
		}
		if x.Start <= ch.start {
			fd, ok1 := devs[ch.from.Dev]
			td, ok2 := devs[ch.to.Dev]
			if !ok1 || !ok2 {
				return nil, fmt.Errorf("no device for the legs of chunk [%d,%d)", ch.start, ch.end)
			}
			n := ch.end - ch.start
			t = append(t, dmtable.Target{
				Start: dmtable.Sectors(ch.start), Length: dmtable.Sectors(n),
				Params: &dmtable.Mirror{
					Log: dmtable.MirrorLog{Type: "core", RegionSize: dmtable.Sectors(regionFor(region, n))},
					// A leg that fails a write is failed and the write
					// held until F's next (noflush) suspend; without it
					// the kernel acknowledges the write once one leg has
					// it, and the copy kept may be the other one.
					HandleErrors: true,
					Legs: []dmtable.MirrorLeg{
						{Dev: fd.Ref(), Offset: dmtable.Sectors(int64(ch.start) + ch.from.Delta)},
						{Dev: td.Ref(), Offset: dmtable.Sectors(int64(ch.start) + ch.to.Delta)},
					},
				},
			})
		}
		if err := emit(max(ch.end, x.Start), x.End, x.On); err != nil {
			return nil, err
		}
	}
	if err := t.Validate(); err != nil {
		return nil, fmt.Errorf("internal error: table for %+v: %w", st, err)
	}
	return t, nil
}
