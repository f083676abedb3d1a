package convert

import "unsafe"

func uintptrOf(v *uint64) uintptr { return uintptr(unsafe.Pointer(v)) }
