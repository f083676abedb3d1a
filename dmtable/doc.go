// Package dmtable is dmconvert's device-mapper library, in pure Go (no
// libdevmapper, no cgo, no dmsetup processes).
//
// It has two halves. The model (Table, Target and the per-target types,
// Sectors, Dev, DevRef, Key, the status parsers) is a set of values with
// no syscalls: tables parse from and print to the exact lines the kernel
// uses, validate, compare and can have their device references rewritten.
// The Client is the only code that talks to the kernel, through ioctls on
// /dev/mapper/control.
//
// Two things a reader must know: bytes and sectors never mix (Sectors is
// always 512-byte units, whatever the device's logical block size), and a
// crypt key never appears in String() or %v; the kernel payload is built by
// an explicit call (Target.Payload, Table.Payload), which only the Client
// uses.
//
// This package knows nothing about LVM or LUKS.
//
// # The model
//
// A Table is a list of Targets; a Target is a range (Start, Length) and
// Params. Params are *Linear, *Striped, *Crypt, *Mirror, *Error, *Zero, or
// *Other for any other target type, whose parameters are kept verbatim.
// Build them by value:
//
//	t := dmtable.Table{
//		{Start: 0, Length: a, Params: &dmtable.Linear{Dev: d.Ref(), Offset: 0}},
//		{Start: a, Length: n, Params: &dmtable.Mirror{
//			Log:  dmtable.MirrorLog{Type: "core", RegionSize: 1024},
//			Legs: []dmtable.MirrorLeg{{Dev: d.Ref(), Offset: a}, {Dev: c.Ref(), Offset: a}},
//		}},
//	}
//
// Parse and ParseTable read `dmsetup table` lines (with --showkeys for real
// keys). For every line the kernel prints, Parse(line).Payload() == line,
// and String() == line for lines without a hex key (dmsetup prints a
// trailing space after an empty parameter list; we do not). For any
// accepted input, Parse(t.Payload()) is equal to t (fuzzed by FuzzParse).
// Table.Equal compares canonical kernel forms (option order and default
// options do not matter; keys compared in constant time).
//
// Table.Validate checks what kernel 6.1 checks that a model can: targets
// start at 0, are contiguous, do not overlap, have non-zero lengths; mirror
// region sizes are powers of two, at least 2 sectors and at most the target
// length (the target need not be a multiple); 2 to 9 mirror legs; keep_log
// needs handle_errors; the kernel's core and disk logs refuse
// block_on_error; crypt sector sizes are powers of two in [512, 4096] that
// divide the length and the offset; stripes divide the length. Load does
// not validate: the kernel's verdict is authoritative.
//
// Table.ReplaceDevice rewrites every reference to one device into another
// (for restacking LVs onto an intermediate device); Table.Devices lists
// them. For *Other targets both use a documented heuristic (fields of the
// form major:minor or /dev/...).
//
// Keys (Key) are hex material, a keyring reference (":64:logon:desc") or
// none ("-"). Every fmt verb prints the masked form dmsetup prints without
// --showkeys (one '0' per hex digit); Wipe zeroes the material. The Client
// sends and reads tables that may hold keys with DM_SECURE_DATA_FLAG and
// clears its buffers; Go strings made on the way (Payload) cannot be
// wiped, so key material may linger in the heap until collected.
//
// Status lines parse with ParseStatus; mirror statuses ("2 254:0 253:3
// 12/32 1 AA 1 core") into MirrorStatus, whose Synced is true only when
// every region is in sync and every leg's health letter is 'A'.
//
// # The Client
//
// Open returns one long-lived handle on /dev/mapper/control; no global
// state, safe for concurrent use. Every ioctl goes through Client.ioctl,
// which builds the struct dm_ioctl buffer (interface version 4.0.0, which
// every version-4 kernel accepts; data_start right after the 312-byte
// header), sets the flags, retries EINTR, regrows the buffer on
// DM_BUFFER_FULL_FLAG for commands that may be repeated (never for
// DM_DEV_WAIT or messages), handles udev cookies, and wraps errors.
//
// Operations: Version, List, Create, CreateWithTable, Load, ClearInactive,
// Suspend (NoFlush, SkipLockfs), Resume, Remove, RemoveDeferred, Rename,
// SetUUID, Info, Table, InactiveTable, Status, Deps, Wait (DM_DEV_WAIT,
// blocking), WaitEvent (cancellable), TargetVersions, TargetVersion,
// Message.
//
// WaitEvent(ctx, name, eventNr) returns when the device's event number
// differs from eventNr (a mirror finishing its copy raises an event). It
// opens its own control handle, arms DM_DEV_ARM_POLL, reads the event
// number, and poll()s the handle together with a pipe that ctx's
// cancellation writes to. Arming before reading means an event between
// the read and the poll still wakes the poll.
//
// Errors are *OpError{Op, Device, Err}; Err is the errno (possibly
// wrapped). errors.Is matches both the errno and a sentinel: ErrBusy
// (EBUSY, e.g. removing an open device), ErrExists (EBUSY from create,
// rename or set-uuid: the kernel's answer for a taken name or UUID; or
// EEXIST), ErrNotFound (ENXIO, ENODEV), ErrInvalid (EINVAL: a table the
// kernel refuses, a UUID already set), ErrUnsupported (ENOENT from load: a
// crypto algorithm the kernel lacks), ErrPermission, ErrNoDeviceMapper,
// ErrNoMemory, ErrKeyNotSet (EAGAIN from resume). The kernel's reason for
// EINVAL is in dmesg.
//
// # Device nodes and udev
//
// Without udev (Options.Udev UdevOff, or UdevAuto when /run/udev/control
// does not exist or DM_DISABLE_UDEV is set, exactly libdevmapper's test),
// the Client makes /dev/mapper/<name> itself: a block node with the
// number from the kernel's answer on Create (re-checked on Resume, which
// also replaces a stale node), moved on Rename, unlinked on Remove. It
// also sets DM_UDEV_DISABLE_DM_RULES_FLAG and
// DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG in the uevent cookie so that udev
// rules, if a udev runs anyway, leave the nodes alone; this is what
// libdevmapper does under DM_DISABLE_UDEV.
//
// With udev (UdevOn, or UdevAuto when udev runs) the Client implements
// libdevmapper's cookie protocol rather than an equivalent of its own, so
// that the stock rules (10-dm.rules, 95-dm-notify.rules) work unchanged
// and udev needs nothing from us: before resume, remove and rename
// (including set-uuid) it creates a SysV semaphore keyed 0x0D4D<<16|base
// with value 1, passes (DM_UDEV_PRIMARY_SOURCE_FLAG<<16)|base in event_nr,
// the kernel hands that to udev as DM_COOKIE, and udev's last rule runs
// `dmsetup udevcomplete $DM_COOKIE`, which decrements the semaphore. If
// the kernel's answer lacks DM_UEVENT_GENERATED_FLAG, no event will come
// and the Client decrements it itself (and manages the node itself). It
// waits for zero with semtimedop, so when the call returns udev has
// finished with the node: no polling for /dev/mapper/<name>, no race.
// The wait is bounded by Options.UdevTimeout (30 s by default); if udev
// never answers (rules missing, udev stuck) the Client falls back to
// creating or removing the node itself. The guest test TestGuestUdevCookie
// checks the protocol against the real kernel's uevents and the real
// `dmsetup udevcomplete`.
//
// # Measured
//
// See BENCHMARKS.md: a load+suspend+resume swap through the Client costs
// milliseconds where the same swap through three dmsetup processes costs
// a quarter of a second in the test VM.
package dmtable
