// Package dmtable is dmconvert's device-mapper library, in pure Go.
//
// It has two halves. The model (Table, Target and the per-target types,
// Sectors, status parsers) is a set of values with no syscalls: tables parse
// from and print to the exact lines the kernel uses, validate, compare and
// can have their device references rewritten. The Client is the only code
// that talks to the kernel, through ioctls on /dev/mapper/control.
//
// Two things a reader must know: bytes and sectors never mix (Sectors is
// always 512-byte units, whatever the device's logical block size), and a
// crypt key never appears in String() or %v; the kernel payload is built by
// an explicit call.
//
// This package knows nothing about LVM or LUKS.
package dmtable
