package convert

import "testing"

// The host side of every guest test of this package: each TestVM* boots
// its own VM (with DMCONVERT_VM=1; see testvm) and they run in parallel,
// three at a time under make test. go test starts parallel tests roughly
// in the order they are declared, so they are declared here longest
// first (QEMU CPU seconds of the last full run in brackets): the last
// VMs to start are short, and no long one runs alone at the end while
// the other core idles.

func TestVMFailpointsResume(t *testing.T)  { vmFailpoints(t, "Resume") }  // [424]
func TestVMFailpointsAbort(t *testing.T)   { vmFailpoints(t, "Abort") }   // [403]
func TestVMLogWritesEncrypt(t *testing.T)  { vmLogWrites(t, "Encrypt") }  // [382]
func TestVMLayouts(t *testing.T)           { vmLayouts(t) }               // [381]
func TestVMCLI(t *testing.T)               { vmCLI(t) }                   // [351]
func TestVMRekey(t *testing.T)             { vmRekey(t) }                 // [309]
func TestVMFailpointsDecrypt(t *testing.T) { vmFailpoints(t, "Decrypt") } // [221]
func TestVMFailpointsRekey(t *testing.T)   { vmFailpoints(t, "Rekey") }   // [204]
func TestVMLogWritesRekey(t *testing.T)    { vmLogWrites(t, "Rekey") }    // [188]
func TestVM(t *testing.T)                  { vmEngine(t) }                // [81, two boots]
func TestVMPowerCut(t *testing.T)          { vmPowerCut(t) }              // [~50 per cut, one VM per cut]
func TestVMBench(t *testing.T)             { vmBench(t) }                 // make bench only
