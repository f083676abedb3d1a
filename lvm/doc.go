// Package lvm discovers what LVM has on a physical volume (its VG, extents,
// free tail, and the LVs mapped onto it), fences LVM away from a VG while a
// conversion runs, and refreshes LVM's view of devices when it ends.
//
// It drives the lvm tools with JSON reports. It never loads device-mapper
// tables itself: restacking is the engine's job.
package lvm
