// Package logwrites reads the log that the kernel's dm-log-writes target
// writes and replays it onto a block device or an image, entry by entry,
// so that a test can look at the disk as it was at any point of the
// recording: in particular at every FLUSH or FUA, which is where a disk
// that loses its volatile write cache in a power cut may be left.
//
// # The on-disk format (drivers/md/dm-log-writes.c)
//
// All numbers are little endian. The log starts with a super block of one
// sector:
//
//	magic      u64  0x6a736677736872
//	version    u64  1
//	nr_entries u64  entries written (updated on FUA, on marks and when
//	                the target is removed)
//	sectorsize u32  the logical block size of the logged device
//
// "Sector" in the log means sectorsize bytes (the logged device's logical
// block size, 512 on most disks), not 512 bytes. Entries follow from byte
// sectorsize on, back to back; each is a sector holding
//
//	sector     u64  first sector written (in sectorsize units)
//	nr_sectors u64  length (sectorsize units)
//	flags      u64  FLUSH 1, FUA 2, DISCARD 4, MARK 8, METADATA 16
//	data_len   u64  length of the mark text that follows in the same sector
//
// followed, except for a discard, by nr_sectors sectors of the data
// written. A mark (dmsetup message <dev> 0 mark <text>) has no data
// sectors; its text sits in the entry sector after the 32-byte header.
// A flush without data is an entry with nr_sectors 0.
//
// The target logs a write when it completes, but a write that is neither
// FUA nor a flush is held back until the next flush completes: the log's
// order is the order in which data reached stable storage, and a prefix
// of the log ending at a FLUSH or FUA entry is a state the disk may be in
// after a power cut that lost its volatile cache. Prefixes ending between
// two flushes are states where the cache was written back partially (in
// one of the possible orders).
//
// # Use
//
// Open reads the super block, Log.Entries walks the entries and Replayer
// applies them in order onto an io.WriterAt (a disk, a file, or Image, an
// in-memory disk). Discards are replayed as zeroes: after a discard a
// disk may return anything, and zeroes are what a thin or SSD target
// returns most often.
package logwrites
