package luks

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"hash"
)

// The anti-forensic information splitter of the LUKS1 specification
// (section 2.4), used unchanged by LUKS2 "luks1" AF keyslots.
//
// A key of n bytes is expanded to stripes*n bytes: stripes-1 random
// blocks s_i and a last block s_last = d_{stripes-1} XOR key, where
// d_0 = 0 and d_{i+1} = H(d_i XOR s_i). H ("diffuse") hashes the block in
// digest-sized pieces: piece j becomes hash(be32(j) || piece)[:len(piece)].

// luksStripes is the only stripe count cryptsetup accepts.
const luksStripes = 4000

// afSectors returns the size in 512-byte sectors of the split material.
func afSectors(keyLen, stripes int) int {
	return (keyLen*stripes + sectorSize - 1) / sectorSize
}

func diffuse(h func() hash.Hash, block []byte) {
	hh := h()
	ds := hh.Size()
	var iv [4]byte
	out := make([]byte, 0, ds)
	for j, off := 0, 0; off < len(block); j, off = j+1, off+ds {
		end := min(off+ds, len(block))
		hh.Reset()
		binary.BigEndian.PutUint32(iv[:], uint32(j))
		hh.Write(iv[:])
		hh.Write(block[off:end])
		out = hh.Sum(out[:0])
		copy(block[off:end], out)
	}
	wipe(out[:cap(out)])
}

func xorInto(dst, a []byte) {
	for i := range dst {
		dst[i] ^= a[i]
	}
}

// afSplit returns the split material for key, padded with zeros to whole
// sectors.
func afSplit(key []byte, stripes int, hashName string) ([]byte, error) {
	h, err := hashByName(hashName)
	if err != nil {
		return nil, err
	}
	n := len(key)
	out := make([]byte, afSectors(n, stripes)*sectorSize)
	if _, err := rand.Read(out[:n*(stripes-1)]); err != nil {
		return nil, fmt.Errorf("af split: %w", err)
	}
	d := make([]byte, n)
	defer wipe(d)
	for i := 0; i < stripes-1; i++ {
		xorInto(d, out[i*n:(i+1)*n])
		diffuse(h, d)
	}
	last := out[(stripes-1)*n : stripes*n]
	copy(last, d)
	xorInto(last, key)
	return out, nil
}

// afMerge recovers an n-byte key from split material.
func afMerge(material []byte, n, stripes int, hashName string) ([]byte, error) {
	h, err := hashByName(hashName)
	if err != nil {
		return nil, err
	}
	if len(material) < n*stripes {
		return nil, fmt.Errorf("af merge: material too short: %w", ErrCorrupt)
	}
	d := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		xorInto(d, material[i*n:(i+1)*n])
		diffuse(h, d)
	}
	xorInto(d, material[(stripes-1)*n:stripes*n])
	return d, nil
}
