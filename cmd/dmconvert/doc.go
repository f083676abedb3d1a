// Command dmconvert changes how a live block device is encrypted while it is
// in use. This package is the command line only: cobra commands, the
// progress bar, --json output and exit codes. All logic lives in the
// library packages.
package main
