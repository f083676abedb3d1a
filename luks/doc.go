// Package luks reads, creates and changes LUKS1 and LUKS2 headers,
// byte-compatible with cryptsetup.
//
// It owns the on-disk header region only (binary headers, JSON metadata,
// keyslot areas); it never touches the data area of a device. Volume keys
// live in memory only, are wiped after use, and never appear in errors,
// logs or String() output.
package luks
