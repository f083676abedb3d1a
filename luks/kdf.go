package luks

import (
	"bufio"
	"crypto/rand"
	"fmt"
	"hash"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/pbkdf2"
)

// PBKDF type names, as cryptsetup spells them.
const (
	KDFArgon2id = "argon2id"
	KDFArgon2i  = "argon2i"
	KDFPBKDF2   = "pbkdf2"
)

// Limits and defaults, equal to cryptsetup 2.6's compiled-in values.
const (
	DefaultIterTime       = 2 * time.Second // --iter-time default (LUKS1 and LUKS2)
	DefaultArgon2Memory   = 1048576         // KiB (1 GiB), --pbkdf-memory default
	DefaultArgon2Parallel = 4               // --pbkdf-parallel default (capped to online CPUs)
	DefaultHash           = "sha256"        // --hash default

	MinPBKDF2Iterations = 1000    // LUKS_SLOT_ITERATIONS_MIN / LUKS_MKD_ITERATIONS_MIN
	MinArgon2Time       = 4       // argon2 minimum time cost
	MinArgon2Memory     = 32      // KiB
	MaxArgon2Memory     = 4194304 // KiB (4 GiB)
	MaxArgon2Parallel   = 4

	// digestIterTime is the PBKDF2 target for the volume key digest
	// (cryptsetup's LUKS_MKD_ITERATIONS_MS).
	digestIterTime = 125 * time.Millisecond
	saltSize       = 32
)

// PBKDF selects how a keyslot's passphrase is stretched. The fields have
// cryptsetup's names and meanings:
//
//	Type        --pbkdf           argon2id (LUKS2 default), argon2i, pbkdf2 (LUKS1: only pbkdf2)
//	Hash        --hash            pbkdf2 hash, default sha256 (ignored by argon2)
//	Iterations  --pbkdf-force-iterations  pbkdf2 iteration count (>= 1000) or
//	            argon2 time cost (>= 4); 0 means benchmark to IterTime
//	MemoryKiB   --pbkdf-memory    argon2 memory in KiB (32..4194304); 0 means
//	            1 GiB, capped to half the physical RAM when benchmarking
//	Parallel    --pbkdf-parallel  argon2 threads (1..4); 0 means 4 capped to
//	            the number of CPUs
//	IterTime    --iter-time       benchmark target; 0 means 2 s
//
// The benchmark is cheap: PBKDF2 is timed over a short run and the count
// scaled linearly; argon2 is timed for one pass over at most 64 MiB and
// extrapolated linearly in passes and memory (argon2's cost is linear in
// both). If even the minimum of 4 passes would exceed IterTime, memory is
// reduced instead, as cryptsetup does.
type PBKDF struct {
	Type       string
	Hash       string
	Iterations uint32
	MemoryKiB  uint32
	Parallel   uint32
	IterTime   time.Duration
}

// kdfParams is a resolved, concrete KDF setting as stored in a header.
type kdfParams struct {
	typ        string
	hash       string // pbkdf2 only
	iterations uint32 // pbkdf2 iterations or argon2 time
	memory     uint32 // KiB, argon2 only
	parallel   uint32 // argon2 only
}

// validate checks stored parameters before running a KDF on them, so a
// hostile header cannot make us panic or allocate without bound.
func (k kdfParams) validate() error {
	switch k.typ {
	case KDFPBKDF2:
		if _, err := hashByName(k.hash); err != nil {
			return err
		}
		if k.iterations == 0 {
			return fmt.Errorf("pbkdf2 with zero iterations: %w", ErrCorrupt)
		}
	case KDFArgon2i, KDFArgon2id:
		if k.iterations == 0 || k.parallel == 0 || k.parallel > 255 {
			return fmt.Errorf("argon2 time %d, threads %d: %w", k.iterations, k.parallel, ErrCorrupt)
		}
		if k.memory < MinArgon2Memory || k.memory > MaxArgon2Memory {
			return fmt.Errorf("argon2 memory %d KiB: %w", k.memory, ErrCorrupt)
		}
	default:
		return fmt.Errorf("kdf %q: %w", k.typ, ErrUnsupported)
	}
	return nil
}

// derive runs the KDF. The caller wipes the result.
func (k kdfParams) derive(pass, salt []byte, keyLen int) ([]byte, error) {
	if err := k.validate(); err != nil {
		return nil, err
	}
	switch k.typ {
	case KDFPBKDF2:
		h, _ := hashByName(k.hash)
		return pbkdf2.Key(pass, salt, int(k.iterations), keyLen, h), nil
	case KDFArgon2i:
		return argon2.Key(pass, salt, k.iterations, k.memory, uint8(k.parallel), uint32(keyLen)), nil
	default:
		return argon2.IDKey(pass, salt, k.iterations, k.memory, uint8(k.parallel), uint32(keyLen)), nil
	}
}

// resolve turns user options into concrete parameters, benchmarking when
// no iteration count is forced. luks1 restricts the type to pbkdf2.
func (p PBKDF) resolve(luks1 bool, keyLen int) (kdfParams, error) {
	typ := p.Type
	if typ == "" {
		typ = KDFArgon2id
		if luks1 {
			typ = KDFPBKDF2
		}
	}
	if luks1 && typ != KDFPBKDF2 {
		return kdfParams{}, fmt.Errorf("pbkdf %q with LUKS1 (only pbkdf2): %w", typ, ErrInvalidArgument)
	}
	target := p.IterTime
	if target == 0 {
		target = DefaultIterTime
	}
	if target < 0 {
		return kdfParams{}, fmt.Errorf("iter-time %v: %w", target, ErrInvalidArgument)
	}
	switch typ {
	case KDFPBKDF2:
		if p.MemoryKiB != 0 || p.Parallel != 0 {
			return kdfParams{}, fmt.Errorf("pbkdf memory or parallel threads set with pbkdf2: %w", ErrInvalidArgument)
		}
		h := p.Hash
		if h == "" {
			h = DefaultHash
		}
		h = strings.ToLower(h)
		if _, err := hashByName(h); err != nil {
			return kdfParams{}, err
		}
		k := kdfParams{typ: typ, hash: h, iterations: p.Iterations}
		if k.iterations == 0 {
			k.iterations = benchPBKDF2(h, keyLen, target)
		} else if k.iterations < MinPBKDF2Iterations {
			return kdfParams{}, fmt.Errorf("forced iteration count %d is below the pbkdf2 minimum %d: %w", k.iterations, MinPBKDF2Iterations, ErrInvalidArgument)
		}
		return k, nil
	case KDFArgon2i, KDFArgon2id:
		forced := p.Iterations != 0
		k := kdfParams{typ: typ, iterations: p.Iterations, memory: p.MemoryKiB, parallel: p.Parallel}
		if k.memory == 0 {
			k.memory = DefaultArgon2Memory
			if !forced {
				k.memory = min(k.memory, halfPhysMemKiB())
			}
		}
		if k.memory < MinArgon2Memory || k.memory > MaxArgon2Memory {
			return kdfParams{}, fmt.Errorf("pbkdf memory %d KiB (allowed %d..%d): %w", k.memory, MinArgon2Memory, MaxArgon2Memory, ErrInvalidArgument)
		}
		if k.parallel == 0 {
			k.parallel = min(DefaultArgon2Parallel, uint32(max(1, runtime.NumCPU())))
		}
		if k.parallel > MaxArgon2Parallel {
			return kdfParams{}, fmt.Errorf("pbkdf parallel %d (maximum %d): %w", k.parallel, MaxArgon2Parallel, ErrInvalidArgument)
		}
		if forced {
			if k.iterations < MinArgon2Time {
				return kdfParams{}, fmt.Errorf("forced iteration count %d is below the %s minimum %d: %w", k.iterations, typ, MinArgon2Time, ErrInvalidArgument)
			}
			return k, nil
		}
		k.iterations, k.memory = benchArgon2(typ, k.memory, k.parallel, keyLen, target)
		return k, nil
	}
	return kdfParams{}, fmt.Errorf("pbkdf %q: %w", typ, ErrUnsupported)
}

// digestIterations is the PBKDF2 count for the volume key digest:
// cryptsetup benchmarks 125 ms, or uses the minimum 1000 when the user
// forced the keyslot's iteration count (no benchmark at all).
func digestIterations(p PBKDF, hash string, keyLen int) uint32 {
	if p.Iterations != 0 {
		return MinPBKDF2Iterations
	}
	return benchPBKDF2(hash, keyLen, digestIterTime)
}

func benchPBKDF2(hash string, keyLen int, target time.Duration) uint32 {
	h, err := hashByName(hash)
	if err != nil {
		return MinPBKDF2Iterations
	}
	salt := make([]byte, saltSize)
	pass := []byte("benchmark")
	n := 1000
	for {
		start := time.Now()
		wipe(pbkdf2.Key(pass, salt, n, keyLen, h))
		el := time.Since(start)
		if el >= 20*time.Millisecond || n >= 1<<28 {
			it := float64(n) * float64(target) / float64(el)
			if it > 0xffffffff {
				it = 0xffffffff
			}
			return max(MinPBKDF2Iterations, uint32(it))
		}
		n *= 4
	}
}

func benchArgon2(typ string, memory, parallel uint32, keyLen int, target time.Duration) (uint32, uint32) {
	bm := min(memory, 64*1024)
	salt := make([]byte, saltSize)
	_, _ = rand.Read(salt)
	pass := []byte("benchmark")
	start := time.Now()
	if typ == KDFArgon2i {
		wipe(argon2.Key(pass, salt, 1, bm, uint8(parallel), uint32(keyLen)))
	} else {
		wipe(argon2.IDKey(pass, salt, 1, bm, uint8(parallel), uint32(keyLen)))
	}
	perKiBPass := float64(time.Since(start)) / float64(bm)
	if perKiBPass <= 0 {
		perKiBPass = 1
	}
	t := float64(target) / (perKiBPass * float64(memory))
	if t >= MinArgon2Time {
		if t > 0xffffffff {
			t = 0xffffffff
		}
		return uint32(t), memory
	}
	m := float64(target) / (perKiBPass * MinArgon2Time)
	mem := uint32(max(m, MinArgon2Memory))
	return MinArgon2Time, min(mem, memory)
}

// halfPhysMemKiB is half the physical memory (cryptsetup never asks
// argon2 for more when it benchmarks), or the default if unknown.
func halfPhysMemKiB() uint32 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return DefaultArgon2Memory
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kb, err := strconv.ParseUint(fields[1], 10, 64)
			if err != nil || kb < 128*1024 || kb > 0xffffffff {
				return DefaultArgon2Memory
			}
			return uint32(kb / 2)
		}
	}
	return DefaultArgon2Memory
}

func randomBytes(n int) ([]byte, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("reading random bytes: %w", err)
	}
	return b, nil
}

func pbkdf2Key(pass, salt []byte, iter, keyLen int, h func() hash.Hash) []byte {
	return pbkdf2.Key(pass, salt, iter, keyLen, h)
}
