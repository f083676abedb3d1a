package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/dmconvert/dmconvert/convert"
)

// parseSize reads a byte count: a plain number of bytes, or a number with
// a binary suffix K, M, G or T (also written k, KiB, KB: all powers of
// 1024, as cryptsetup and LVM read them), or S for 512-byte sectors.
func parseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("empty size")
	}
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q does not start with a number", s)
	}
	n, err := strconv.ParseUint(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	var mult uint64
	switch strings.ToUpper(strings.TrimSpace(t[i:])) {
	case "", "B":
		mult = 1
	case "S":
		mult = 512
	case "K", "KB", "KIB":
		mult = 1 << 10
	case "M", "MB", "MIB":
		mult = 1 << 20
	case "G", "GB", "GIB":
		mult = 1 << 30
	case "T", "TB", "TIB":
		mult = 1 << 40
	default:
		return 0, fmt.Errorf("size %q has an unknown unit %q (use K, M, G, T or S for 512-byte sectors)", s, t[i:])
	}
	if n > math.MaxUint64/mult {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n * mult, nil
}

// sizeFlag is a pflag.Value for a byte size with suffixes.
type sizeFlag struct {
	v   uint64
	set bool
}

func (f *sizeFlag) String() string {
	if !f.set {
		return ""
	}
	return strconv.FormatUint(f.v, 10)
}

func (f *sizeFlag) Set(s string) error {
	v, err := parseSize(s)
	if err != nil {
		return err
	}
	f.v, f.set = v, true
	return nil
}

func (f *sizeFlag) Type() string { return "size" }

// humanBytes prints a byte count with a binary unit.
func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// chunkAndRegion checks --chunk-size and --region-size of decrypt and
// rekey and returns them in sectors (0: the default).
func chunkAndRegion(chunkSize, regionSize sizeFlag) (chunk, region convert.Sectors, err error) {
	if chunkSize.set {
		if chunkSize.v == 0 || chunkSize.v%4096 != 0 {
			return 0, 0, usagef("--chunk-size %d is not a non-zero multiple of 4096 bytes", chunkSize.v)
		}
		chunk = convert.Sectors(chunkSize.v / 512)
	}
	if regionSize.set {
		rs := regionSize.v
		if rs < 4096 || rs&(rs-1) != 0 {
			return 0, 0, usagef("--region-size %d is not a power of two of at least 4096 bytes", rs)
		}
		region = convert.Sectors(rs / 512)
	}
	return chunk, region, nil
}
