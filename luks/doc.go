// Package luks reads, creates and changes LUKS1 and LUKS2 headers,
// byte-compatible with cryptsetup (verified against cryptsetup 2.6.1:
// headers we write are dumped, opened and activated by it with the volume
// key we chose, and our re-serialisation of its headers is byte-identical).
//
// It owns the on-disk header region only (binary headers, JSON metadata,
// keyslot areas, dmconvert checkpoint records); it never touches the data
// area of a device. Volume keys live in memory only (VolumeKey), are
// wiped after use, and never appear in errors, logs or String() output.
//
// # Model
//
// A Header is held entirely in memory: Read parses one from an
// io.ReaderAt (both LUKS2 metadata copies are checked; the valid one with
// the higher sequence id wins, Copies reports the other), Create builds a
// new one for a volume key the caller chose. Changes (keyslots, tokens,
// requirements, checkpoints, disguise) are made in memory and reach a
// device only through explicit writes, so the caller orders every write:
//
//   - Image / FirstBlock: the whole header area, or its first 4 KiB (the
//     block that decides what the disk is, design.md section 3).
//   - WriteHeader(w, FirstBlockFirst|FirstBlockLast): the image in two
//     writes with a sync between them.
//   - WriteMetadata: LUKS2 both metadata copies with seqid+1 (primary,
//     sync, secondary, sync), never the keyslot area; LUKS1 the phdr.
//   - Commit: keyslot changes: new material, then metadata, then the wipe
//     of removed keyslots' material.
//   - SaveCheckpoint: the dmconvert checkpoint (LUKS2 token + metadata
//     write; LUKS1 one 512-byte record).
//   - Reveal: LUKS1 first block with the real magic.
//
// # Conversion in progress
//
// LUKS2: the mandatory requirement "dmconvert" (SetRequirement) makes
// cryptsetup refuse to activate the device and to change or restore its
// header ("Unmet LUKS2 requirements detected"); note that cryptsetup 2.6.1
// still accepts `open --test-passphrase` on it, since it checks
// requirements only when activating. The engine's checkpoint is a token of
// type "dmconvert" whose payload is opaque bytes (stored base64); unknown
// tokens and every unknown JSON member are preserved.
//
// LUKS1: the header is written with the magic "DMCVT\xba\xbe" (bytes
// [0,8) read "DMCVT\xba\xbe\x01"), which neither cryptsetup nor blkid
// recognises; Read still parses it. The checkpoint lives in two
// alternating CRC32C-protected 512-byte records in the last 4 KiB of the
// header area, which must lie beyond the keyslot material
// (CheckCheckpointRoom). A rekey stages its new key in a free keyslot of
// the disguised header, named by a record in the phdr's padding
// (AddUnboundKeyslot, UnlockUnbound, BindSegment; rekey1.go); the
// records then sit after the keyslot material.
//
// # Supported features
//
// Ciphers (data and keyslots): aes-xts-plain64 (default, 256/512-bit
// keys), aes-xts-plain, aes-cbc-essiv:sha256, aes-cbc-plain64,
// aes-cbc-plain (128/192/256-bit). Keyslot material is encrypted with the
// segment cipher in 512-byte sectors from IV 0, as cryptsetup does.
// KDFs: argon2id, argon2i (LUKS2), pbkdf2 with sha1/sha224/sha256/
// sha384/sha512. Sector sizes 512..4096 (LUKS2), 512 (LUKS1). Header
// sizes from MinHeaderSize (LUKS2, 512-bit key: 290816 bytes) to any
// 4 KiB multiple; defaults 16 MiB (LUKS2) and 2 MiB (LUKS1).
// Unsupported (ErrUnsupported): other ciphers, integrity segments,
// reencryption keyslots, non-pbkdf2 digests.
//
// A Header is not safe for concurrent use.
package luks
