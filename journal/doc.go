// Package journal is the durable record of a conversion, in a bbolt file:
// the plan, the intent and result of every step, and progress.
//
// Every commit is fsynced (never NoSync). The file is opened with a lock
// timeout so two runs cannot share it. It never holds a volume key in the
// clear: it stores the LUKS header image, whose keyslots are wrapped by the
// user's passphrase.
package journal
