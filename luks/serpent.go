package luks

import (
	"crypto/cipher"
	"encoding/binary"
	"fmt"
	"math/bits"
)

// Serpent (Anderson, Biham, Knudsen), the block cipher of TrueCrypt and
// VeraCrypt volumes made with "-b SERPENT-256-XTS", written from the
// specification in its bitsliced form: the 128-bit block as four
// little-endian 32-bit words, 32 rounds of a key mixing, one of eight
// 4-bit S-boxes applied across the words bit by bit, and a linear
// transformation (the last round: a second key mixing instead); the 132
// prekey words come from the key padded to 256 bits with a single one
// bit, each the rotated XOR of four earlier ones, the golden-ratio
// constant and its index, and round key i is S-box (3-i) mod 8 applied
// to four of them. The byte order is the Linux kernel's (its serpent
// cipher is what cryptsetup maps a TrueCrypt Serpent volume to).
//
// Only headers are decrypted with it (448 bytes per passphrase try), so
// it applies the S-boxes as tables, one bit column at a time, rather
// than as the boolean circuits of fast implementations.

var serpentS = [8][16]byte{
	{3, 8, 15, 1, 10, 6, 5, 11, 14, 13, 4, 2, 7, 0, 9, 12},
	{15, 12, 2, 7, 9, 0, 5, 10, 1, 11, 14, 8, 6, 13, 3, 4},
	{8, 6, 7, 9, 3, 12, 10, 15, 13, 1, 14, 4, 0, 11, 5, 2},
	{0, 15, 11, 8, 12, 9, 6, 3, 13, 1, 2, 4, 10, 7, 5, 14},
	{1, 15, 8, 3, 12, 0, 11, 6, 2, 5, 4, 10, 9, 14, 7, 13},
	{15, 5, 2, 11, 4, 10, 9, 12, 0, 3, 14, 8, 13, 6, 7, 1},
	{7, 2, 12, 5, 8, 4, 6, 11, 14, 9, 1, 15, 13, 3, 10, 0},
	{1, 13, 15, 0, 14, 8, 2, 11, 7, 4, 12, 10, 9, 3, 5, 6},
}

var serpentSInv [8][16]byte

func init() {
	for i := range serpentS {
		for x, y := range serpentS[i] {
			serpentSInv[i][y] = byte(x)
		}
	}
}

const (
	serpentRounds = 32
	serpentPhi    = 0x9e3779b9
)

// serpentSbox applies box to the bit columns of x: bit j of x[0..3] is
// the nibble's bit 0..3.
func serpentSbox(box *[16]byte, x *[4]uint32) {
	var y [4]uint32
	for j := range 32 {
		n := (x[0]>>j)&1 | (x[1]>>j&1)<<1 | (x[2]>>j&1)<<2 | (x[3]>>j&1)<<3
		o := uint32(box[n])
		y[0] |= (o & 1) << j
		y[1] |= (o >> 1 & 1) << j
		y[2] |= (o >> 2 & 1) << j
		y[3] |= (o >> 3 & 1) << j
	}
	*x = y
}

func serpentLT(x *[4]uint32) {
	x[0] = bits.RotateLeft32(x[0], 13)
	x[2] = bits.RotateLeft32(x[2], 3)
	x[1] ^= x[0] ^ x[2]
	x[3] ^= x[2] ^ x[0]<<3
	x[1] = bits.RotateLeft32(x[1], 1)
	x[3] = bits.RotateLeft32(x[3], 7)
	x[0] ^= x[1] ^ x[3]
	x[2] ^= x[3] ^ x[1]<<7
	x[0] = bits.RotateLeft32(x[0], 5)
	x[2] = bits.RotateLeft32(x[2], 22)
}

func serpentLTInv(x *[4]uint32) {
	x[2] = bits.RotateLeft32(x[2], -22)
	x[0] = bits.RotateLeft32(x[0], -5)
	x[2] ^= x[3] ^ x[1]<<7
	x[0] ^= x[1] ^ x[3]
	x[3] = bits.RotateLeft32(x[3], -7)
	x[1] = bits.RotateLeft32(x[1], -1)
	x[3] ^= x[2] ^ x[0]<<3
	x[1] ^= x[0] ^ x[2]
	x[2] = bits.RotateLeft32(x[2], -3)
	x[0] = bits.RotateLeft32(x[0], -13)
}

type serpentCipher struct {
	k [serpentRounds + 1][4]uint32
}

// newSerpent returns Serpent with a 128-, 192- or 256-bit key (TrueCrypt
// uses 256).
func newSerpent(key []byte) (cipher.Block, error) {
	switch len(key) {
	case 16, 24, 32:
	default:
		return nil, fmt.Errorf("serpent: key of %d bytes (16, 24 or 32)", len(key))
	}
	var kb [32]byte
	copy(kb[:], key)
	if len(key) < 32 {
		kb[len(key)] = 1 // the one bit after the key, then zeros
	}
	var w [8 + 4*(serpentRounds+1)]uint32
	for i := range 8 {
		w[i] = binary.LittleEndian.Uint32(kb[4*i:])
	}
	clear(kb[:])
	for i := 8; i < len(w); i++ {
		w[i] = bits.RotateLeft32(w[i-8]^w[i-5]^w[i-3]^w[i-1]^serpentPhi^uint32(i-8), 11)
	}
	c := new(serpentCipher)
	for i := range c.k {
		x := [4]uint32{w[8+4*i], w[8+4*i+1], w[8+4*i+2], w[8+4*i+3]}
		serpentSbox(&serpentS[(3-i+32)%8], &x)
		c.k[i] = x
	}
	clear(w[:])
	return c, nil
}

func (c *serpentCipher) BlockSize() int { return 16 }

func (c *serpentCipher) Encrypt(dst, src []byte) {
	var x [4]uint32
	for i := range x {
		x[i] = binary.LittleEndian.Uint32(src[4*i:])
	}
	for r := range serpentRounds {
		for i := range x {
			x[i] ^= c.k[r][i]
		}
		serpentSbox(&serpentS[r%8], &x)
		if r < serpentRounds-1 {
			serpentLT(&x)
		}
	}
	for i := range x {
		binary.LittleEndian.PutUint32(dst[4*i:], x[i]^c.k[serpentRounds][i])
	}
}

func (c *serpentCipher) Decrypt(dst, src []byte) {
	var x [4]uint32
	for i := range x {
		x[i] = binary.LittleEndian.Uint32(src[4*i:]) ^ c.k[serpentRounds][i]
	}
	for r := serpentRounds - 1; r >= 0; r-- {
		if r < serpentRounds-1 {
			serpentLTInv(&x)
		}
		serpentSbox(&serpentSInv[r%8], &x)
		for i := range x {
			x[i] ^= c.k[r][i]
		}
	}
	for i := range x {
		binary.LittleEndian.PutUint32(dst[4*i:], x[i])
	}
}
