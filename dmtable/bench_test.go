//go:build linux

package dmtable

import (
	"fmt"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkGuestSwap measures one table swap, the engine's per-chunk
// device-mapper cost: load a table, suspend, resume. Through the Client
// (ioctls) and through dmsetup processes (three execs per swap), on an
// idle device and under a concurrent O_DIRECT writer. Guest only
// (DMCONVERT_VM=1 DMCONVERT_VM_BENCH=. go test -run TestVM ./dmtable/).
func BenchmarkGuestSwap(b *testing.B) {
	c, a, _ := guestSetup(b)
	const n = 65536 // 32 MiB of vda
	// Two tables mapping the same sectors differently, so every load is a
	// real change of table.
	tables := [2]Table{
		mustTable(b, fmt.Sprintf("0 %d linear %s 0", n, a)),
		mustTable(b, fmt.Sprintf("0 %d linear %s 0\n%d %d linear %s %d", n/2, a, n/2, n/2, a, n/2)),
	}
	name := "dmt-bench"
	if _, err := c.CreateWithTable(name, "", tables[0]); err != nil {
		b.Fatal(err)
	}
	defer c.Remove(name)

	// Time spent in each ioctl of the client's swaps, for the breakdown.
	var tLoad, tSuspend, tResume time.Duration
	swapClient := func(i int) error {
		t0 := time.Now()
		if _, err := c.Load(name, tables[i%2]); err != nil {
			return err
		}
		t1 := time.Now()
		if _, err := c.Suspend(name, 0); err != nil {
			return err
		}
		t2 := time.Now()
		_, err := c.Resume(name)
		t3 := time.Now()
		tLoad += t1.Sub(t0)
		tSuspend += t2.Sub(t1)
		tResume += t3.Sub(t2)
		return err
	}
	swapDmsetup := func(i int) error {
		for _, args := range [][]string{
			{"load", name, "--table", tables[i%2].Payload()},
			{"suspend", name},
			{"resume", name},
		} {
			if out, err := exec.Command("dmsetup", args...).CombinedOutput(); err != nil {
				return fmt.Errorf("dmsetup %v: %v: %s", args, err, out)
			}
		}
		return nil
	}
	for _, tool := range []struct {
		name string
		swap func(int) error
	}{{"client", swapClient}, {"dmsetup", swapDmsetup}} {
		for _, load := range []string{"idle", "writer"} {
			b.Run(tool.name+"/"+load, func(b *testing.B) {
				tLoad, tSuspend, tResume = 0, 0, 0
				var stop func() (bytes int64, d time.Duration)
				if load == "writer" {
					stop = startWriter(b, c.NodePath(name), n)
				}
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if err := tool.swap(i); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				if stop != nil {
					bytes, d := stop()
					b.ReportMetric(float64(bytes)/d.Seconds()/(1<<20), "writer-MiB/s")
				}
				if tool.name == "client" {
					n := float64(b.N)
					b.ReportMetric(float64(tLoad.Microseconds())/n, "load-µs/op")
					b.ReportMetric(float64(tSuspend.Microseconds())/n, "suspend-µs/op")
					b.ReportMetric(float64(tResume.Microseconds())/n, "resume-µs/op")
				}
			})
		}
	}
}

// startWriter writes 64 KiB blocks with O_DIRECT over the first n sectors
// of path, round and round, until the returned stop is called.
func startWriter(b *testing.B, path string, n Sectors) func() (int64, time.Duration) {
	f, err := os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		b.Fatal(err)
	}
	buf := alignedBuf(b, 64<<10)
	for i := range buf {
		buf[i] = byte(i)
	}
	var quit atomic.Bool
	var written atomic.Int64
	var wg sync.WaitGroup
	var werr error
	start := time.Now()
	wg.Add(1)
	go func() {
		defer wg.Done()
		off := int64(0)
		for !quit.Load() {
			if _, err := f.WriteAt(buf, off); err != nil {
				werr = err
				return
			}
			written.Add(int64(len(buf)))
			off += int64(len(buf))
			if off+int64(len(buf)) > int64(n.Bytes()) {
				off = 0
			}
		}
	}()
	return func() (int64, time.Duration) {
		quit.Store(true)
		wg.Wait()
		f.Close()
		if werr != nil {
			b.Fatalf("writer: %v", werr)
		}
		return written.Load(), time.Since(start)
	}
}
