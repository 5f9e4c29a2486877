// Package pattern fills memory with a reproducible pseudo-random stream and
// checksums it, so a test can tell that a migrated process kept its memory.
package pattern

import "hash/crc64"

var table = crc64.MakeTable(crc64.ECMA)

// Fill writes the xorshift64* stream for seed into buf. The same seed and
// length always give the same bytes; the bytes do not compress, so CRIU has
// to move every page.
func Fill(buf []byte, seed uint64) {
	x := seed | 1
	i := 0
	for ; i+8 <= len(buf); i += 8 {
		x ^= x >> 12
		x ^= x << 25
		x ^= x >> 27
		v := x * 2685821657736338717
		buf[i] = byte(v)
		buf[i+1] = byte(v >> 8)
		buf[i+2] = byte(v >> 16)
		buf[i+3] = byte(v >> 24)
		buf[i+4] = byte(v >> 32)
		buf[i+5] = byte(v >> 40)
		buf[i+6] = byte(v >> 48)
		buf[i+7] = byte(v >> 56)
	}
	for ; i < len(buf); i++ {
		buf[i] = byte(i)
	}
}

// Sum is the CRC-64 (ECMA) of buf.
func Sum(buf []byte) uint64 {
	return crc64.Checksum(buf, table)
}

// Expected is the checksum of Fill(make([]byte, size), seed), computed in
// chunks so the caller does not need size bytes at once.
func Expected(size int, seed uint64) uint64 {
	buf := make([]byte, size)
	Fill(buf, seed)
	return Sum(buf)
}
