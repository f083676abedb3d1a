package convert

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

// The host side of every guest test of this package: each TestVM* boots
// its own VM (with DMCONVERT_VM=1; see testvm) and they run in parallel,
// their VMs queued longest first (vmQueue) in as many slots as
// DMCONVERT_VM_SLOTS says (default the host's CPUs plus one: a guest
// keeps about 0.6-0.7 of a core busy). go test alone starts parallel tests in
// no particular order: in a run with four at a time the layout VM, the
// longest, started 12 minutes in and ran alone at the end. make test
// runs go test with -parallel 32, so every VM test is admitted and the
// queue alone orders them.

// vmRank: the VM tests, longest first (VM wall seconds in `make test` of
// 2026-11-24, 9791394, in brackets). The power cuts' VMs come last:
// short, they fill the end.
var vmRank = []string{
	"TestVMLayouts",           // [808, before the md RAID1 layout]
	"TestVMCLI",               // [781]
	"TestVMRekeyPlain",        // [601]
	"TestVMRekey",             // [499]
	"TestVMDecrypt",           // [207]
	"TestVMUdev",              // [169]
	"TestVMFailpointsAbort",   // [141]
	"TestVMFailpointsResume",  // [140]
	"TestVMLogWritesRekey",    // [133]
	"TestVMFailpointsDecrypt", // [130]
	"TestVMLogWritesEncrypt",  // [123]
	"TestVMFailpointsRekey",   // [101]
	"TestVM",                  // [~90, two boots]
	"TestVMPowerCut",          // [36-51 per cut, two boots each]
}

// vmQueue hands out this package's VM slots, lowest rank first.
var vmQueue = testvm.NewQueue(0, 500*time.Millisecond)

// vmParallel, when VMs were asked for (DMCONVERT_VM=1), makes t a
// parallel test whose VM waits for a slot of vmQueue (ranked by its
// top-level name in vmRank); otherwise it does nothing.
func vmParallel(t *testing.T) {
	if !testvm.VMRequested() {
		return
	}
	t.Parallel()
	top, _, _ := strings.Cut(t.Name(), "/")
	rank := slices.Index(vmRank, top)
	if rank < 0 {
		rank = len(vmRank)
	}
	vmQueue.Acquire(t, rank)
}

func TestVMFailpointsResume(t *testing.T)  { vmFailpoints(t, "Resume") }
func TestVMFailpointsAbort(t *testing.T)   { vmFailpoints(t, "Abort") }
func TestVMLogWritesEncrypt(t *testing.T)  { vmLogWrites(t, "Encrypt") }
func TestVMLayouts(t *testing.T)           { vmLayouts(t) }
func TestVMCLI(t *testing.T)               { vmCLI(t) }
func TestVMRekey(t *testing.T)             { vmRekey(t, rekeyLUKSRun) }
func TestVMRekeyPlain(t *testing.T)        { vmRekey(t, rekeyPlainRun) }
func TestVMFailpointsDecrypt(t *testing.T) { vmFailpoints(t, "Decrypt") }
func TestVMDecrypt(t *testing.T)           { vmDecrypt(t) }
func TestVMFailpointsRekey(t *testing.T)   { vmFailpoints(t, "Rekey") }
func TestVMLogWritesRekey(t *testing.T)    { vmLogWrites(t, "Rekey") }
func TestVMUdev(t *testing.T)              { vmUdev(t) }
func TestVM(t *testing.T)                  { vmEngine(t) }
func TestVMPowerCut(t *testing.T)          { vmPowerCut(t) }
func TestVMBench(t *testing.T)             { vmBench(t) } // make bench only
