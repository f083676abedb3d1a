package convert

import (
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Benchmark of online rekey (`dmconvert rekey`), run by TestVMBench in the
// same VM boot as the encrypt benchmarks (select it alone with
// DMCONVERT_VM_BENCH='^BenchmarkGuestRekey$'). Every round, on the
// 256 MiB disk (vda):
//
//   - dmcrypt: the dm-crypt write rate (benchDMCrypt: O_DIRECT 1 MiB
//     writes through a plain aes-xts-plain64 mapping, best of one and two
//     writers), measured before the round and once more after the last
//     round; a round is compared with the mean of the measurements on
//     either side of it.
//   - cryptsetup: `cryptsetup reencrypt` of a LUKS2 volume made by
//     luksFormat (aes-xts-plain64, 512-bit key, 512-byte sectors, the
//     default 16 MiB header), open and in use: an LVM PV filling the
//     mapping, an ext4 LV mounted and a raw LV, both written to with
//     fsync during the run. The device is active, so cryptsetup 2.6
//     re-encrypts it online (its default resilience, checksum, and
//     hotzone size); the new keyslot uses pbkdf2 with 1000 iterations.
//   - dmconvert: `dmconvert rekey` of the same volume built the same way,
//     under the same writer, the statically built command with its
//     defaults (4 MiB gap and chunk). DMCONVERT_BENCH_REKEY_CHUNKS lists
//     --chunk-size values (e.g. "8M,12M"; "1M:in-place" adds --in-place)
//     for extra dmconvert runs in
//     every round, right after the default one; they are reported apart
//     and do not count for the verdict. So does DMCONVERT_BENCH_ALT's
//     binary (an engine change to compare), run right after the default.
//
// Rates are bytes of the data segment (what both re-encrypt) over the
// process's wall time; dmconvert's rate from its first JSON event to its
// done event is reported too. The target (the rekey issue): dmconvert at
// least 5x cryptsetup's rate; the longest writer stall (4 KiB write +
// fsync) is reported, not judged. docs/benchmarks.md has the numbers.

// benchRekeyChunksEnv: extra --chunk-size values for dmconvert rekey runs.
const benchRekeyChunksEnv = "DMCONVERT_BENCH_REKEY_CHUNKS"

// rekeyRun is one cryptsetup or dmconvert run of BenchmarkGuestRekey.
type rekeyRun struct {
	round             int
	chunk             string  // dmconvert's --chunk-size ("" for the default)
	extra             string  // what an extra run (not in the verdict) is: a chunk size or the other binary
	payload           int64   // bytes re-encrypted: the data segment
	wallRate          float64 // MiB/s over the process's wall time
	convRate          float64 // dmconvert: MiB/s from the first event to done
	stall, p99        time.Duration
	idle, idleP99     time.Duration // the writer alone before the run
	writes            int
	rssMiB, rusageMiB float64 // VmHWM (sampled; dmconvert only), rusage maxrss
}

// rekeyBench is the state of BenchmarkGuestRekey.
type rekeyBench struct {
	*benchSuite
	cs, dmc []rekeyRun
	extra   []rekeyRun // dmconvert with DMCONVERT_BENCH_REKEY_CHUNKS, or the DMCONVERT_BENCH_ALT binary
}

// BenchmarkGuestRekey: rounds of dm-crypt / cryptsetup reencrypt /
// dmconvert rekey on the 256 MiB disk, then one more dm-crypt
// measurement and a summary with the verdict on the 5x target.
func BenchmarkGuestRekey(b *testing.B) {
	rb := &rekeyBench{benchSuite: newBenchSuite(b)}
	s := rb.benchSuite
	s.dmRate = nil // this benchmark's own dm-crypt measurements
	rounds := int(envInt(benchRoundsEnv, 3))
	small := fmt.Sprintf("disk=%s", sizeName(benchDiskSize))
	bin := dmconvertBin(b)
	var chunks []string
	if v := os.Getenv(benchRekeyChunksEnv); v != "" {
		chunks = strings.Split(v, ",")
	}
	for r := 1; r <= rounds; r++ {
		run := fmt.Sprintf("/run=%d", r)
		b.Run(small+"/dmcrypt"+run, func(b *testing.B) { s.benchDMCrypt(b, s.disk) })
		b.Run(small+"/cryptsetup-reencrypt"+run, func(b *testing.B) { rb.benchCryptsetupReencrypt(b, r) })
		b.Run(small+"/dmconvert-rekey"+run, func(b *testing.B) { rb.benchRekey(b, bin, r, "", "") })
		if s.alt != "" {
			b.Run(small+"/dmconvert-alt-rekey"+run, func(b *testing.B) { rb.benchRekey(b, s.alt, r, "", "the other binary ("+benchAltEnv+")") })
		}
		for _, c := range chunks {
			c = strings.TrimSpace(c)
			what := "--chunk-size " + c
			if size, ok := strings.CutSuffix(c, ":in-place"); ok {
				what = "--in-place --chunk-size " + size
			}
			b.Run(small+"/dmconvert-rekey,chunk="+c+run, func(b *testing.B) { rb.benchRekey(b, bin, r, c, what) })
		}
	}
	b.Run(small+"/dmcrypt/after", func(b *testing.B) { s.benchDMCrypt(b, s.disk) })
	b.Run("summary", func(b *testing.B) {
		sum, m := rb.summary()
		for k, v := range m {
			b.ReportMetric(v, k)
		}
		if b.N == 1 {
			b.Log("\n" + sum)
		}
	})
}

// luksBenchStack makes an installer-style LUKS2+LVM stack on disk:
// luksFormat with cheap pbkdf2, open as <disk>_crypt, a PV filling the
// mapping, a mounted 64 MiB ext4 LV with 8 MiB of data and a raw LV
// filling the rest of the VG. It returns the stack and the mapping name.
func (s *benchSuite) luksBenchStack(b testing.TB, disk string) (*benchStack, string) {
	b.Helper()
	s.seq++
	name := filepath.Base(disk) + "_crypt"
	sh(b, "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--sector-size", "512", "--key-file", pwFile, disk)
	sh(b, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	m := "/dev/mapper/" + name
	st := &benchStack{vg: fmt.Sprintf("vgk%d", s.seq), mnt: fmt.Sprintf("/mnt/bench%d", s.seq), payload: int64(blockDevBytes(b, m))}
	st.raw = "/dev/mapper/" + st.vg + "-raw"
	sh(b, "pvcreate", "-y", m)
	sh(b, "vgcreate", "-y", st.vg, m)
	sh(b, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", "64m", st.vg)
	sh(b, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-l", "100%FREE", st.vg)
	sh(b, "vgchange", "-ay", st.vg)
	ext := "/dev/mapper/" + st.vg + "-ext"
	sh(b, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", ext)
	os.MkdirAll(st.mnt, 0o755)
	sh(b, "mount", "-o", "noatime", ext, st.mnt)
	data := make([]byte, 8*guestMiB)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(st.mnt, "data"), data, 0o644); err != nil {
		b.Fatal(err)
	}
	sh(b, "sync")
	return st, name
}

// luksDigests is the Digests section of luksDump: a new volume key comes
// with a new digest (another salt), so it differs after a rekey. It holds
// no key material.
func luksDigests(b testing.TB, disk string) string {
	dump := sh(b, "cryptsetup", "luksDump", disk)
	i := strings.Index(dump, "Digests:")
	if i < 0 {
		b.Fatalf("luksDump %s has no Digests section:\n%s", disk, dump)
	}
	return dump[i:]
}

// checkRekeyedBench checks what a rekey run claims: the mapping is one
// crypt target again, the header carries a new digest and no
// reencryption or dmconvert mark, stock cryptsetup opens it with the
// passphrase, LVM sees the PV, and the ext4 LV is clean. It unmounts the
// stack's file system.
func checkRekeyedBench(b testing.TB, disk, name, oldDigests string, st *benchStack) {
	b.Helper()
	if tab := sh(b, "dmsetup", "table", name); !strings.Contains(tab, "crypt aes-xts-plain64") || strings.Count(strings.TrimSpace(tab), "\n") != 0 {
		b.Fatalf("table of %s after the rekey: %s", name, tab)
	}
	dump := sh(b, "cryptsetup", "luksDump", disk)
	if strings.Contains(dump, "dmconvert") || strings.Contains(dump, "reencrypt") {
		b.Fatalf("the header of %s still has a mark of the rekey:\n%s", disk, dump)
	}
	if luksDigests(b, disk) == oldDigests {
		b.Fatalf("the digest of %s did not change: the volume key is the old one", disk)
	}
	sh(b, "cryptsetup", "open", "--test-passphrase", "--key-file", pwFile, disk)
	if pvs := sh(b, "pvs", "--noheadings", "-o", "pv_name,vg_name"); !strings.Contains(pvs, "/dev/mapper/"+name) || !strings.Contains(pvs, st.vg) {
		b.Fatalf("LVM does not see %s on %s: %s", st.vg, name, pvs)
	}
	sh(b, "umount", st.mnt)
	sh(b, "e2fsck", "-f", "-n", "/dev/mapper/"+st.vg+"-ext")
}

// startRekeyWriter starts the writer on the stack and measures it alone
// for 3 s (the floor its stalls during the run compare with).
func startRekeyWriter(b testing.TB, st *benchStack) (w *stallWriter, idle, idleP99 time.Duration) {
	w = startStallWriter(b, st.raw, st.mnt)
	time.Sleep(3 * time.Second)
	idle, idleP99, _ = w.reset()
	return w, idle, idleP99
}

// benchCryptsetupReencrypt: cryptsetup reencrypt of the open, mounted,
// written-to LUKS2 volume (online).
func (rb *rekeyBench) benchCryptsetupReencrypt(b *testing.B, round int) {
	s := rb.benchSuite
	var run rekeyRun
	var out []byte
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		resetDisk(b, s.disk)
		st, name := s.luksBenchStack(b, s.disk)
		old := luksDigests(b, s.disk)
		w, idle, idleP99 := startRekeyWriter(b, st)
		args := []string{"reencrypt", "--key-file", pwFile, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
			"--active-name", name, "-q", s.disk}
		cs := exec.Command("cryptsetup", args...)
		cs.Dir = "/tmp" // as in benchCryptsetup: never the 9p share
		b.StartTimer()
		t0 := time.Now()
		var err error
		out, err = cs.CombinedOutput()
		el := time.Since(t0)
		b.StopTimer()
		time.Sleep(200 * time.Millisecond)
		stall, p99, writes := w.finish(b)
		if err != nil {
			b.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		checkRekeyedBench(b, s.disk, name, old, st)
		run = rekeyRun{round: round, payload: st.payload, wallRate: mib2(st.payload) / el.Seconds(),
			stall: stall, p99: p99, idle: idle, idleP99: idleP99, writes: writes}
		if ru, ok := cs.ProcessState.SysUsage().(*syscall.Rusage); ok {
			run.rusageMiB = mib2(ru.Maxrss * 1024)
		}
		resetDisk(b, s.disk)
		b.StartTimer()
	}
	rb.cs = append(rb.cs, run)
	dm := s.dmRate[len(s.dmRate)-1]
	b.ReportMetric(run.wallRate, "MiB/s")
	b.ReportMetric(run.wallRate/dm, "x_dmcrypt")
	b.ReportMetric(ms(run.stall), "max_stall_ms")
	b.ReportMetric(ms(run.p99), "p99_stall_ms")
	b.ReportMetric(ms(run.idle), "idle_max_ms")
	b.ReportMetric(ms(run.idleP99), "idle_p99_ms")
	b.ReportMetric(run.rusageMiB, "rusage_rss_MiB")
	b.Logf("payload %.0f MiB in %.2fs; writer: %d writes during the run, longest %v (p99 %v); alone before the run: longest %v (p99 %v)",
		mib2(run.payload), mib2(run.payload)/run.wallRate, run.writes, run.stall, run.p99, run.idle, run.idleP99)
	if o := strings.TrimSpace(string(out)); o != "" {
		b.Logf("cryptsetup's output:\n%s", o)
	}
}

// benchRekey: dmconvert rekey of the open, mounted, written-to LUKS2
// volume.
func (rb *rekeyBench) benchRekey(b *testing.B, bin string, round int, chunk, extra string) {
	s := rb.benchSuite
	var run rekeyRun
	var res *convertResult
	var startup time.Duration // process start to the first event
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		resetDisk(b, s.disk)
		st, name := s.luksBenchStack(b, s.disk)
		old := luksDigests(b, s.disk)
		journal := filepath.Join(s.state, fmt.Sprintf("rekey%d.journal", s.seq))
		w, idle, idleP99 := startRekeyWriter(b, st)
		b.StartTimer()
		t0 := time.Now()
		args := []string{"rekey", name, "--batch-mode", "--json", "--key-file", pwFile, "--journal", journal}
		if size, ok := strings.CutSuffix(chunk, ":in-place"); ok {
			args = append(args, "--in-place", "--chunk-size", size)
		} else if chunk != "" {
			args = append(args, "--chunk-size", chunk)
		}
		res = runDMConvert(b, bin, args...)
		b.StopTimer()
		startup = res.first.Sub(t0)
		time.Sleep(200 * time.Millisecond)
		stall, p99, writes := w.finish(b)
		checkRekeyedBench(b, s.disk, name, old, st)
		os.Remove(journal)
		run = rekeyRun{round: round, chunk: chunk, extra: extra, payload: st.payload,
			wallRate: mib2(st.payload) / res.wall.Seconds(), convRate: mib2(st.payload) / res.conv.Seconds(),
			stall: stall, p99: p99, idle: idle, idleP99: idleP99, writes: writes,
			rssMiB: mib2(res.hwm), rusageMiB: mib2(res.maxrss)}
		resetDisk(b, s.disk)
		b.StartTimer()
	}
	if extra == "" {
		rb.dmc = append(rb.dmc, run)
	} else {
		rb.extra = append(rb.extra, run)
	}
	dm := s.dmRate[len(s.dmRate)-1]
	b.ReportMetric(run.wallRate, "MiB/s")
	b.ReportMetric(run.convRate, "conv_MiB/s")
	b.ReportMetric(run.wallRate/dm, "x_dmcrypt")
	if len(rb.cs) > 0 {
		b.ReportMetric(run.wallRate/rb.cs[len(rb.cs)-1].wallRate, "x_cryptsetup")
	}
	b.ReportMetric(ms(run.stall), "max_stall_ms")
	b.ReportMetric(ms(run.p99), "p99_stall_ms")
	b.ReportMetric(ms(run.idle), "idle_max_ms")
	b.ReportMetric(ms(run.idleP99), "idle_p99_ms")
	b.ReportMetric(ms(res.maxSusp), "suspend_ms")
	b.ReportMetric(run.rssMiB, "rss_MiB")
	b.ReportMetric(run.rusageMiB, "rusage_rss_MiB")
	b.ReportMetric(float64(res.chunks), "chunks")
	var ph []string
	for _, p := range res.phases {
		ph = append(ph, fmt.Sprintf("%s: %.2fs", p.name, p.d.Seconds()))
	}
	b.Logf("payload %.0f MiB; process %.2fs, rekey %.2fs (first event to done; %.2fs before the first event, %.2fs after done); %d chunks; writer: %d writes during the run, longest %v (p99 %v); alone before the run: longest %v (p99 %v); phases: %s",
		mib2(run.payload), res.wall.Seconds(), res.conv.Seconds(), startup.Seconds(), (res.wall - res.conv - startup).Seconds(), res.chunks, run.writes, run.stall, run.p99, run.idle, run.idleP99, strings.Join(ph, "; "))
	if e := strings.TrimSpace(res.stderr); e != "" {
		b.Logf("dmconvert's stderr:\n%s", e)
	}
	b.Logf("memory: VmHWM %.1f MiB, rusage maxrss %.1f MiB", run.rssMiB, run.rusageMiB)
}

// summary: every round, the medians and the verdict; and the medians as
// metrics.
func (rb *rekeyBench) summary() (string, map[string]float64) {
	var sb strings.Builder
	m := map[string]float64{}
	dmr := rb.dmRate
	fmt.Fprintf(&sb, "rekey summary of this VM run (%s disk)\n", sizeName(benchDiskSize))
	fmt.Fprintf(&sb, "dm-crypt O_DIRECT write (best of 1 and 2 writers), before each round and after the last: %v MiB/s\n", fmtF(dmr))
	n := min(len(rb.cs), len(rb.dmc), len(dmr)-1)
	if n <= 0 {
		sb.WriteString("no complete round\n")
		return sb.String(), m
	}
	fmt.Fprintf(&sb, "data segment re-encrypted: %s\n", sizeName(rb.dmc[0].payload))
	fmt.Fprintf(&sb, "%-5s %7s %7s %7s %6s %6s %7s %7s %7s %7s %7s %7s %7s\n",
		"round", "dmcrypt", "cs", "dmc", "dmconv", "x_cs", "x_dmc", "cs_stl", "cs_p99", "dm_stl", "dm_p99", "idle", "rss")
	var dmcR, convR, csR, xcs, xdm, xdmCS, stalls, p99s, csStalls, csP99s, rss, csRSS []float64
	for i := 0; i < n; i++ {
		c, d := rb.cs[i], rb.dmc[i]
		dm := (dmr[i] + dmr[i+1]) / 2
		fmt.Fprintf(&sb, "%-5d %7.1f %7.2f %7.2f %6.2f %6.2f %7.3f %5.0fms %5.0fms %5.0fms %5.0fms %5.0fms %7.1f\n",
			d.round, dm, c.wallRate, d.wallRate, d.convRate, d.wallRate/c.wallRate, d.wallRate/dm,
			ms(c.stall), ms(c.p99), ms(d.stall), ms(d.p99), ms(max(c.idle, d.idle)), d.rssMiB)
		dmcR = append(dmcR, d.wallRate)
		convR = append(convR, d.convRate)
		csR = append(csR, c.wallRate)
		xcs = append(xcs, d.wallRate/c.wallRate)
		xdm = append(xdm, d.wallRate/dm)
		xdmCS = append(xdmCS, c.wallRate/dm)
		stalls = append(stalls, ms(d.stall))
		p99s = append(p99s, ms(d.p99))
		csStalls = append(csStalls, ms(c.stall))
		csP99s = append(csP99s, ms(c.p99))
		rss = append(rss, d.rssMiB)
		csRSS = append(csRSS, c.rusageMiB)
	}
	fmt.Fprintf(&sb, "(cs, dmc: MiB/s over the process wall time; dmconv: dmconvert from its first event to done; x_cs, x_dmc: dmc over cs and over the mean dm-crypt rate around the round; stl/p99: the writer's longest write+fsync and p99 during the run; idle: its longest alone before the runs; rss: dmconvert's VmHWM)\n")
	fmt.Fprintf(&sb, "medians of %d rounds: cryptsetup reencrypt (online) %.2f MiB/s (%.3f of dm-crypt), dmconvert rekey %.2f MiB/s (%.3f of dm-crypt; %.2f MiB/s without process start and end)\n",
		n, medianF(csR), medianF(xdmCS), medianF(dmcR), medianF(xdm), medianF(convR))
	verdict := "NOT met"
	if medianF(xcs) >= 5 {
		verdict = "met"
	}
	fmt.Fprintf(&sb, "  >= 5x cryptsetup: %.2fx (rounds %v): %s\n", medianF(xcs), fmtF(xcs), verdict)
	fmt.Fprintf(&sb, "  writer during dmconvert: longest %.0f ms (worst of all rounds), p99 %.0f ms (median); during cryptsetup: longest %.0f ms, p99 %.0f ms\n",
		slices.Max(stalls), medianF(p99s), slices.Max(csStalls), medianF(csP99s))
	fmt.Fprintf(&sb, "  peak RSS: dmconvert %.1f MiB (VmHWM, worst), cryptsetup %.1f MiB (rusage maxrss, worst)\n", slices.Max(rss), slices.Max(csRSS))
	for _, e := range rb.extra {
		if e.round > n {
			continue
		}
		dm := (dmr[e.round-1] + dmr[e.round]) / 2
		fmt.Fprintf(&sb, "  extra: round %d, dmconvert rekey, %s: %.2f MiB/s (%.2f first event to done), %.2fx that round's cryptsetup, %.3f of dm-crypt; writer longest %.0f ms, p99 %.0f ms; VmHWM %.1f MiB\n",
			e.round, e.extra, e.wallRate, e.convRate, e.wallRate/rb.cs[e.round-1].wallRate, e.wallRate/dm, ms(e.stall), ms(e.p99), e.rssMiB)
	}
	m["cs_MiB/s"] = medianF(csR)
	m["dmc_MiB/s"] = medianF(dmcR)
	m["dmc_conv_MiB/s"] = medianF(convR)
	m["x_cryptsetup"] = medianF(xcs)
	m["x_dmcrypt"] = medianF(xdm)
	m["max_stall_ms"] = slices.Max(stalls)
	m["p99_stall_ms"] = medianF(p99s)
	m["cs_max_stall_ms"] = slices.Max(csStalls)
	m["rss_MiB"] = slices.Max(rss)
	return sb.String(), m
}
