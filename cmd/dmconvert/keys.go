package main

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/spf13/pflag"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/luks"
)

// keyOptions are cryptsetup's key input flags.
type keyOptions struct {
	file   string
	offset int64
	size   int64
}

func (k *keyOptions) register(fs *pflag.FlagSet) {
	fs.StringVar(&k.file, "key-file", "", "read the passphrase from this file (binary, whole file); - for standard input")
	fs.Int64Var(&k.offset, "keyfile-offset", 0, "skip this many bytes of the key file")
	fs.Int64Var(&k.size, "keyfile-size", 0, "read exactly this many bytes of the key file (0: all of it)")
}

func (k *keyOptions) validate() error {
	if k.offset < 0 || k.size < 0 {
		return usagef("--keyfile-offset and --keyfile-size must not be negative")
	}
	return nil
}

func (k *keyOptions) source(a *app, prompt string) luks.KeySource {
	return luks.KeySource{
		KeyFile: k.file, KeyfileOffset: k.offset, KeyfileSize: k.size,
		Prompt: prompt, Stdin: a.stdin, PromptOut: a.stderr,
	}
}

// readKey reads the passphrase of an existing header (resume, abort).
func (a *app) readKey(k keyOptions, device string) ([]byte, error) {
	key, err := luks.ReadKey(k.source(a, fmt.Sprintf("Enter passphrase for %s: ", device)))
	if err != nil {
		return nil, fmt.Errorf("reading the passphrase: %w", err)
	}
	return key, nil
}

// readNewKey reads the passphrase of a new header: on a terminal it is
// asked twice, as cryptsetup luksFormat does; from a key file or a
// non-terminal standard input it is read once.
func (a *app) readNewKey(k keyOptions, device string) ([]byte, error) {
	key, err := a.readKey(k, device)
	if err != nil {
		return nil, err
	}
	interactive := a.stdinTTY && (k.file == "" || k.file == "-")
	if !interactive {
		return key, nil
	}
	again, err := luks.ReadKey(k.source(a, "Verify passphrase: "))
	if err != nil {
		luks.WipeBytes(key)
		return nil, fmt.Errorf("reading the passphrase: %w", err)
	}
	defer luks.WipeBytes(again)
	if len(key) != len(again) || subtle.ConstantTimeCompare(key, again) != 1 {
		luks.WipeBytes(key)
		return nil, usagef("passphrases do not match")
	}
	return key, nil
}

// headerFactory builds the LUKS header of an encrypt run: lo with the
// device's sector size, keyslot 0 opened by pass. Bad options are
// refusals (nothing is written before the header exists).
func headerFactory(device string, lo luks.Options, pass []byte) convert.HeaderFactory {
	return func(volumeKey []byte, sectorSize uint32) (convert.HeaderFormat, error) {
		o := lo
		o.SectorSize = int(sectorSize)
		vk := luks.NewVolumeKeyFromBytes(volumeKey)
		defer vk.Wipe()
		h, err := luks.Create(o, vk, pass)
		if err != nil {
			if errors.Is(err, luks.ErrInvalidArgument) || errors.Is(err, luks.ErrUnsupported) {
				return nil, &convert.RefusalError{Device: device, Reason: "cannot create the LUKS header: " + err.Error()}
			}
			return nil, err
		}
		if err := h.CheckCheckpointRoom(); err != nil {
			return nil, &convert.RefusalError{Device: device, Reason: err.Error(), Hint: "use a larger --header-size"}
		}
		lh, err := convert.NewLUKSHeader(h)
		if err != nil {
			return nil, err
		}
		return lh, nil
	}
}

// opener unlocks the header image a journal holds with key.
func opener(key []byte) convert.HeaderOpener {
	return func(img []byte) (convert.HeaderFormat, convert.Keys, error) {
		h, ks, err := convert.OpenLUKSImage(img, key)
		if err != nil {
			return nil, convert.Keys{}, err
		}
		return h, ks, nil
	}
}

// randomPassphrase is the throwaway passphrase of a --dry-run or preview
// header (never shown, never stored).
func randomPassphrase() ([]byte, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	return b, nil
}

// newUUID returns a random (version 4) UUID, so the preview shown before
// the confirmation and the header written after it carry the same one.
func newUUID() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:], nil
}
