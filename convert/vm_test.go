package convert

import (
	"slices"
	"strings"
	"testing"
)

// The host side of every guest test of this package: each TestVM* boots
// its own VM (with DMCONVERT_VM=1; see testvm), in parallel. Under make
// test at most DMCONVERT_VM_SLOTS of them run at a time (testvm.Slot),
// started longest first, in the order of vmOrder: the last to start are
// short, and no long one runs on alone at the end while a core idles.

func TestVMFailpointsResume(t *testing.T)  { vmFailpoints(t, "Resume") }
func TestVMFailpointsAbort(t *testing.T)   { vmFailpoints(t, "Abort") }
func TestVMLogWritesEncrypt(t *testing.T)  { vmLogWrites(t, "Encrypt") }
func TestVMLayouts(t *testing.T)           { vmLayouts(t) }
func TestVMCLI(t *testing.T)               { vmCLI(t) }
func TestVMRekey(t *testing.T)             { vmRekey(t) }
func TestVMFailpointsDecrypt(t *testing.T) { vmFailpoints(t, "Decrypt") }
func TestVMFailpointsRekey(t *testing.T)   { vmFailpoints(t, "Rekey") }
func TestVMLogWritesRekey(t *testing.T)    { vmLogWrites(t, "Rekey") }
func TestVM(t *testing.T)                  { vmEngine(t) }
func TestVMPowerCut(t *testing.T)          { vmPowerCut(t) }
func TestVMBench(t *testing.T)             { vmBench(t) }

// vmOrder is the start order: QEMU CPU seconds in the last full runs
// (2026-11-22, before -cpu max,-erms,-fsrm, which made every guest ~1/3
// faster) in brackets.
var vmOrder = []string{
	"TestVMFailpointsResume",  // 424
	"TestVMFailpointsAbort",   // 403
	"TestVMLogWritesEncrypt",  // 382
	"TestVMLayouts",           // 381
	"TestVMCLI",               // 351
	"TestVMRekey",             // 309
	"TestVMFailpointsDecrypt", // 221
	"TestVMFailpointsRekey",   // 204
	"TestVMLogWritesRekey",    // 188
	"TestVM",                  // 81, two boots
	"TestVMPowerCut",          // ~50 per cut, one slot per cut
}

// vmPriority is the test's place in vmOrder (its top-level test's).
func vmPriority(t *testing.T) int {
	name, _, _ := strings.Cut(t.Name(), "/")
	if i := slices.Index(vmOrder, name); i >= 0 {
		return i
	}
	return len(vmOrder)
}
