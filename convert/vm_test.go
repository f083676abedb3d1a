package convert

import "testing"

// The host side of every guest test of this package: each TestVM* boots
// its own VM (with DMCONVERT_VM=1; see testvm) and they run in parallel,
// four at a time under make test (scripts/test.sh: -parallel 4). They are declared longest first
// (QEMU CPU seconds of a full run in brackets), but go test does not start
// parallel tests in declaration order: in two runs the encrypt-abort
// matrix started about 20 minutes in. A queue that forced the order
// (longest first, 3 slots) made the run slower (32.0 min against 28.8),
// so the order is left to go test.

func TestVMFailpointsResume(t *testing.T)  { vmFailpoints(t, "Resume") }  // [424]
func TestVMFailpointsAbort(t *testing.T)   { vmFailpoints(t, "Abort") }   // [403]
func TestVMLogWritesEncrypt(t *testing.T)  { vmLogWrites(t, "Encrypt") }  // [382]
func TestVMLayouts(t *testing.T)           { vmLayouts(t) }               // [381]
func TestVMCLI(t *testing.T)               { vmCLI(t) }                   // [351]
func TestVMRekey(t *testing.T)             { vmRekey(t, rekeyLUKSRun) }   // [~300 with the next]
func TestVMRekeyPlain(t *testing.T)        { vmRekey(t, rekeyPlainRun) }  // [~260]
func TestVMFailpointsDecrypt(t *testing.T) { vmFailpoints(t, "Decrypt") } // [221]
func TestVMDecrypt(t *testing.T)           { vmDecrypt(t) }               // [new]
func TestVMFailpointsRekey(t *testing.T)   { vmFailpoints(t, "Rekey") }   // [204]
func TestVMLogWritesRekey(t *testing.T)    { vmLogWrites(t, "Rekey") }    // [188]
func TestVMUdev(t *testing.T)              { vmUdev(t) }                  // [247]
func TestVM(t *testing.T)                  { vmEngine(t) }                // [81, two boots]
func TestVMPowerCut(t *testing.T)          { vmPowerCut(t) }              // [~50 per cut, one VM per cut]
func TestVMBench(t *testing.T)             { vmBench(t) }                 // make bench only
