// Package testvm boots a real Linux kernel (Debian's bookworm kernel, with
// device-mapper, dm-crypt, dm-mirror and LVM) under QEMU and runs tests in
// it. The development machine's own kernel has no device-mapper, so every
// test that must touch the real thing goes through here.
//
// Unit tests never need this package. Guest tests skip on the host unless
// the VM run was requested, and a requested run that cannot boot fails.
package testvm
