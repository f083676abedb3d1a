package convert

// FailpointExitCode is the exit status of a process stopped by a
// failpoint (test builds only).
const FailpointExitCode = 113
