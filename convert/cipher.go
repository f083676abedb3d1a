package convert

import (
	"crypto/rand"
	"errors"
	"fmt"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/luks"
)

// The cipher of a rekey's new key. What can be checked without the
// kernel is checked by CheckCipher (the form of the spec, the key size's
// arithmetic, and exact key sizes for the ciphers the luks package runs
// itself); whether the kernel offers the cipher, mode and IV mode is
// asked of the kernel itself, by loading a crypt table into a private
// device that is never resumed (probeCrypt).

// CheckCipher checks a dm-crypt cipher spec (cipher-chainmode-ivmode,
// e.g. aes-xts-plain64, serpent-xts-plain64, aes-cbc-essiv:sha256) and a
// volume key size in bits for a LUKS2 data segment, without the kernel.
// The error says what is wrong.
func CheckCipher(cipher string, keyBits int) error {
	if err := checkCipherForm(cipher); err != nil {
		return err
	}
	return checkKeySize(cipher, keyBits)
}

// checkCipherForm checks a cipher spec's form.
func checkCipherForm(cipher string) error {
	sp, err := dmtable.Cipher(cipher).Spec()
	if err != nil {
		if cipher == "" {
			return errors.New("the cipher is empty")
		}
		return err // it names the cipher
	}
	form := "give it as cipher-chainmode-ivmode, e.g. aes-xts-plain64 or serpent-xts-plain64"
	switch {
	case sp.Capi:
		return fmt.Errorf("cipher %q: the kernel crypto API form (capi:) is not supported; %s", cipher, form)
	case sp.KeyCount != 0:
		return fmt.Errorf("cipher %q: multi-key ciphers (name:count) are not supported; %s", cipher, form)
	case sp.Cipher == "cipher_null" || sp.Cipher == "null":
		return fmt.Errorf("cipher %q would leave the data unencrypted", cipher)
	case sp.ChainMode == "":
		return fmt.Errorf("cipher %q has no chaining mode; %s", cipher, form)
	case sp.IVMode == "":
		return fmt.Errorf("cipher %q has no IV mode; %s", cipher, form)
	}
	// The luks package checks the names' characters (the spec goes into
	// the header's JSON and the kernel's table).
	return luks.CheckCipherForm(cipher)
}

// checkKeySize checks a key size (bits) for a well-formed cipher spec (or
// for any cipher, when it is empty).
func checkKeySize(cipher string, keyBits int) error {
	switch {
	case keyBits <= 0:
		return fmt.Errorf("key size %d bits: it must be positive", keyBits)
	case keyBits%8 != 0:
		return fmt.Errorf("key size %d bits is not a multiple of 8", keyBits)
	case keyBits/8 > luks.MaxVolumeKeySize:
		return fmt.Errorf("key size %d bits is larger than LUKS2 allows (%d bits)", keyBits, luks.MaxVolumeKeySize*8)
	}
	if cipher == "" {
		return nil
	}
	sp, _ := dmtable.Cipher(cipher).Spec()
	keyBytes := keyBits / 8
	if sp.ChainMode == "xts" && keyBytes%2 != 0 {
		return fmt.Errorf("cipher %s: XTS splits the key into two halves of equal size, which a %d-bit key does not allow", cipher, keyBits)
	}
	// The ciphers the luks package runs itself take known key sizes.
	if sizes, err := luks.KeySizes(cipher); err == nil {
		ok := false
		bits := make([]string, len(sizes))
		for i, s := range sizes {
			ok = ok || s == keyBytes
			bits[i] = fmt.Sprintf("%d-", s*8)
		}
		if !ok {
			last := len(bits) - 1
			return fmt.Errorf("cipher %s takes a %s or %sbit key, not %d bits", cipher, strings.Join(bits[:last], ", "), bits[last], keyBits)
		}
	}
	return luks.CheckSegmentCipher(cipher, keyBytes)
}

// CheckRekeyCipher checks a rekey's --cipher and --key-size (bits; "" and
// 0: keep the source's) as far as they can be checked without the source
// header, so that a command line can refuse them before it asks for a
// passphrase. PlanRekey checks them again, completely.
func CheckRekeyCipher(cipher string, keyBits int) error {
	switch {
	case cipher != "" && keyBits != 0:
		return CheckCipher(cipher, keyBits)
	case cipher != "":
		return checkCipherForm(cipher)
	case keyBits != 0:
		return checkKeySize("", keyBits)
	}
	return nil
}

// rekeyCrypt is the crypt spec of a rekey's new key: the source's cipher
// and key size unless cipher or keyBits (0: keep) are given; the sector
// size stays.
func rekeyCrypt(src CryptSpec, cipher string, keyBits int) (CryptSpec, error) {
	cs := src
	if cipher != "" {
		cs.Cipher = cipher
	}
	bits := cs.KeyBytes * 8
	if keyBits != 0 {
		bits = keyBits
	}
	if err := checkCipherForm(cs.Cipher); err != nil {
		return cs, err
	}
	if err := checkKeySize(cs.Cipher, bits); err != nil {
		if keyBits == 0 && cipher != "" {
			return cs, fmt.Errorf("%w (the key size stays %d bits unless --key-size is given)", err, bits)
		}
		return cs, err
	}
	cs.KeyBytes = bits / 8
	return cs, nil
}

// CryptoAlgorithms is implemented by hosts that can list the names of the
// kernel's crypto algorithms (/proc/crypto), to say why the kernel
// refused a cipher.
type CryptoAlgorithms interface {
	CryptoAlgorithms() (map[string]bool, error)
}

// probeCrypt asks the kernel whether dm-crypt takes cs: a crypt table
// with a throwaway key of cs's size over the disk at off is loaded into a
// private device (created with a zero table, never resumed with the
// crypt one), which is then removed. Nothing is read or written.
func (e *Engine) probeCrypt(id string, cs CryptSpec, disk dmtable.Dev, off, length Sectors) error {
	key := make([]byte, cs.KeyBytes)
	if _, err := rand.Read(key); err != nil {
		return err
	}
	k := dmtable.HexKey(key)
	clear(key)
	defer k.Wipe()
	name, uuid := transientDevice(id, "probe")
	zero := dmtable.Table{{Start: 0, Length: dmtable.Sectors(length), Params: &dmtable.Zero{}}}
	if _, err := e.DM.Create(name, uuid, zero); err != nil {
		return fmt.Errorf("creating %s to try the cipher: %w", name, err)
	}
	lerr := e.DM.Load(name, dmtable.Table{cryptTarget(0, length, cs, k, 0, disk, off)})
	if err := e.DM.Remove(name); err != nil {
		return errors.Join(lerr, fmt.Errorf("removing %s: %w", name, err))
	}
	if lerr == nil {
		return nil
	}
	why := "an unknown cipher, chaining mode or IV mode, or a key size the cipher does not take; the kernel log (dmesg) says which"
	if h, ok := e.Host.(CryptoAlgorithms); ok {
		if algs, err := h.CryptoAlgorithms(); err == nil {
			why = cipherRefusal(cs, algs)
		}
	}
	return &kernelRefusal{why: fmt.Sprintf("the kernel's dm-crypt refuses cipher %s with a %d-bit key: %s", cs.Cipher, cs.KeyBytes*8, why), err: lerr}
}

type kernelRefusal struct {
	why string
	err error
}

func (k *kernelRefusal) Error() string { return k.why + " (" + k.err.Error() + ")" }
func (k *kernelRefusal) Unwrap() error { return k.err }

// cipherRefusal says why the kernel probably refused cs, from the names
// of its crypto algorithms after the refused load (which had the kernel
// load the modules it could find).
func cipherRefusal(cs CryptSpec, algs map[string]bool) string {
	sp, err := dmtable.Cipher(cs.Cipher).Spec()
	if err != nil {
		return err.Error()
	}
	switch {
	case !algs[sp.Cipher]:
		return fmt.Sprintf("the kernel has no cipher %q (not built in, no module)", sp.Cipher)
	case !algs[sp.ChainMode+"("+sp.Cipher+")"]:
		return fmt.Sprintf("the kernel has no %s mode for %s", sp.ChainMode, sp.Cipher)
	}
	iv := sp.IVMode
	if sp.IVOpts != "" {
		iv += ":" + sp.IVOpts
	}
	return fmt.Sprintf("it has %s(%s), so dm-crypt refuses IV mode %q or the key size (the kernel log, dmesg, says which)", sp.ChainMode, sp.Cipher, iv)
}
