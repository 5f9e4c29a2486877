//go:build linux

package precopy

import (
	"math/rand"
	"testing"
)

// nullOut counts what a Diff writes.
type nullOut struct{ lit, refs int }

func (o *nullOut) Literal(b []byte)                    { o.lit += len(b) }
func (o *nullOut) Refs(id, addr uint64, hashes []byte) { o.refs += len(hashes) / HashSize }

// BenchmarkDiffAtFreeze is the relay's cost at the freeze: CRIU's stream
// of 64 MiB of pages read in 256 KiB pieces, hashed and compared with
// what was sent ahead (all unchanged, or all changed). Its MB/s is the
// hash-and-compare rate; a GiB costs 1024/rate seconds.
func BenchmarkDiffAtFreeze(b *testing.B) {
	const pages = 64 << 20 / PageSize
	id, base := TaskID(100), uint64(0x7f0000000000)
	mem := make([]byte, pages*PageSize)
	rand.New(rand.NewSource(1)).Read(mem)
	stream := psHeader(psIovAddF, pePresent, pages, base, id)
	stream = append(stream, mem...)
	for _, name := range []string{"unchanged", "changed"} {
		b.Run(name, func(b *testing.B) {
			sent := NewSent(Hasher{Seed: 5})
			for i := 0; i < pages; i++ {
				h := sent.h.Sum(mem[i*PageSize : (i+1)*PageSize])
				if name == "changed" {
					h[0] ^= 1
				}
				sent.pages[Key{id, base + uint64(i)*PageSize}] = h
			}
			b.SetBytes(int64(len(mem)))
			b.ResetTimer()
			for n := 0; n < b.N; n++ {
				var out nullOut
				d := NewDiff(sent, &out)
				for s := stream; len(s) > 0; {
					k := min(len(s), 256<<10)
					if err := d.Write(s[:k]); err != nil {
						b.Fatal(err)
					}
					s = s[k:]
				}
			}
		})
	}
}
