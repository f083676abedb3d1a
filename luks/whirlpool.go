package luks

import (
	"encoding/binary"
	"errors"
	"hash"
)

// Whirlpool (ISO/IEC 10118-3:2004, the final version of the design by
// Barreto and Rijmen), the PBKDF2 PRF of TrueCrypt and VeraCrypt volumes
// made with "-a whirlpool". Written from the specification: an 8x8-byte
// state, ten rounds of a substitution (an S-box built from three 4-bit
// mini-boxes), a cyclic shift of column j down by j rows, a multiplication
// of every row by the circulant matrix cir(1, 1, 4, 1, 8, 5, 2, 9) over
// GF(2^8) mod x^8+x^4+x^3+x^2+1, and a round key; the key schedule is the
// same round keyed by constants taken from the S-box; blocks are chained
// Miyaguchi-Preneel from an all-zero start, after MD-strengthening with a
// 256-bit length.

const (
	whirlpoolSize  = 64
	whirlpoolBlock = 64
	whirlpoolRound = 10
)

var (
	// wpT[t][x]: S[x] multiplied into the row a byte in column t feeds,
	// one output byte per column (column 0 the most significant).
	wpT [8][256]uint64
	// wpRC[r]: round r's key-schedule constant (row 0; rows 1-7 zero).
	wpRC [whirlpoolRound + 1]uint64
)

func init() {
	e := [16]byte{0x1, 0xB, 0x9, 0xC, 0xD, 0x6, 0xF, 0x3, 0xE, 0x8, 0x7, 0x4, 0xA, 0x2, 0x5, 0x0}
	r := [16]byte{0x7, 0xC, 0xB, 0xD, 0xE, 0x4, 0x9, 0xF, 0x6, 0x3, 0x8, 0xA, 0x2, 0x5, 0x1, 0x0}
	var ei [16]byte
	for i, v := range e {
		ei[v] = byte(i)
	}
	var s [256]byte
	for u := range 256 {
		a, b := e[u>>4], ei[u&15]
		t := r[a^b]
		s[u] = e[a^t]<<4 | ei[b^t]
	}
	c := [8]byte{1, 1, 4, 1, 8, 5, 2, 9}
	for t := range 8 {
		for x := range 256 {
			var v uint64
			for j := range 8 {
				v |= uint64(gf256Mul(s[x], c[(j-t+8)%8])) << (56 - 8*j)
			}
			wpT[t][x] = v
		}
	}
	for rd := 1; rd <= whirlpoolRound; rd++ {
		wpRC[rd] = binary.BigEndian.Uint64(s[8*(rd-1) : 8*rd])
	}
}

// gf256Mul multiplies in GF(2^8) modulo x^8+x^4+x^3+x^2+1 (0x11d).
func gf256Mul(a, b byte) byte {
	var p byte
	for b != 0 {
		if b&1 != 0 {
			p ^= a
		}
		hi := a & 0x80
		a <<= 1
		if hi != 0 {
			a ^= 0x1d
		}
		b >>= 1
	}
	return p
}

// wpRound is the round without its key: substitution, the column shift
// and the row mixing.
func wpRound(in *[8]uint64) (out [8]uint64) {
	for i := range 8 {
		out[i] = wpT[0][byte(in[i]>>56)] ^
			wpT[1][byte(in[(i+7)&7]>>48)] ^
			wpT[2][byte(in[(i+6)&7]>>40)] ^
			wpT[3][byte(in[(i+5)&7]>>32)] ^
			wpT[4][byte(in[(i+4)&7]>>24)] ^
			wpT[5][byte(in[(i+3)&7]>>16)] ^
			wpT[6][byte(in[(i+2)&7]>>8)] ^
			wpT[7][byte(in[(i+1)&7])]
	}
	return out
}

type whirlpool struct {
	h      [8]uint64
	buf    [whirlpoolBlock]byte
	n      int    // bytes in buf
	length uint64 // bytes hashed (TrueCrypt's inputs are far below 2^61)
}

// newWhirlpool returns a Whirlpool hash.Hash.
func newWhirlpool() hash.Hash { return new(whirlpool) }

func (w *whirlpool) Size() int      { return whirlpoolSize }
func (w *whirlpool) BlockSize() int { return whirlpoolBlock }
func (w *whirlpool) Reset()         { *w = whirlpool{} }

func (w *whirlpool) Write(p []byte) (int, error) {
	n := len(p)
	w.length += uint64(n)
	for len(p) > 0 {
		k := copy(w.buf[w.n:], p)
		w.n += k
		p = p[k:]
		if w.n == whirlpoolBlock {
			w.block(&w.buf)
			w.n = 0
		}
	}
	return n, nil
}

func (w *whirlpool) block(b *[whirlpoolBlock]byte) {
	var m, k, st [8]uint64
	for i := range 8 {
		m[i] = binary.BigEndian.Uint64(b[8*i:])
		k[i] = w.h[i]
		st[i] = m[i] ^ k[i]
	}
	for rd := 1; rd <= whirlpoolRound; rd++ {
		k = wpRound(&k)
		k[0] ^= wpRC[rd]
		st = wpRound(&st)
		for i := range 8 {
			st[i] ^= k[i]
		}
	}
	for i := range 8 {
		w.h[i] ^= st[i] ^ m[i]
	}
}

// MarshalBinary and UnmarshalBinary save and restore the running state
// (crypto/hmac then keeps the keyed pads' states instead of hashing them
// again for every PBKDF2 iteration).
func (w *whirlpool) MarshalBinary() ([]byte, error) {
	b := make([]byte, 0, len(wpMagic)+8*8+whirlpoolBlock+8+1)
	b = append(b, wpMagic...)
	for _, v := range w.h {
		b = binary.BigEndian.AppendUint64(b, v)
	}
	b = append(b, w.buf[:]...)
	b = binary.BigEndian.AppendUint64(b, w.length)
	return append(b, byte(w.n)), nil
}

func (w *whirlpool) UnmarshalBinary(b []byte) error {
	if len(b) != len(wpMagic)+8*8+whirlpoolBlock+8+1 || string(b[:len(wpMagic)]) != wpMagic || b[len(b)-1] >= whirlpoolBlock {
		return errors.New("whirlpool: invalid hash state")
	}
	b = b[len(wpMagic):]
	for i := range w.h {
		w.h[i] = binary.BigEndian.Uint64(b[8*i:])
	}
	b = b[64:]
	copy(w.buf[:], b)
	w.length = binary.BigEndian.Uint64(b[whirlpoolBlock:])
	w.n = int(b[whirlpoolBlock+8])
	return nil
}

const wpMagic = "wrlp\x01"

func (w *whirlpool) Sum(in []byte) []byte {
	d := *w // Sum does not change the running hash
	bits := d.length * 8
	var pad [2 * whirlpoolBlock]byte
	pad[0] = 0x80
	// Pad to 32 bytes short of a block, then the 256-bit length (its top
	// 192 bits zero here).
	n := (whirlpoolBlock - 32 - 1 - d.n + 2*whirlpoolBlock) % whirlpoolBlock
	binary.BigEndian.PutUint64(pad[1+n+24:], bits)
	d.Write(pad[:1+n+32])
	out := make([]byte, whirlpoolSize)
	for i := range 8 {
		binary.BigEndian.PutUint64(out[8*i:], d.h[i])
	}
	return append(in, out...)
}
