// Package convert plans and executes online conversions (encrypt, and later
// rekey and decrypt) with the moving-gap scheme, and resumes or aborts them.
//
// The engine depends only on small interfaces it defines (device mapper,
// volume manager, block device I/O, journal, progress), so it runs against
// an in-memory fake in unit tests and against the kernel in the test VM.
// It never parses flags or prints: progress goes through its Progress
// interface.
package convert
