// Package pagestream knows CRIU's page-server protocol (criu/page-xfer.c)
// as far as phaul's relays read it, and fetches a lazy migration's pages
// ahead of CRIU's lazy-pages daemon (Fetcher).
//
// Every command is a fixed 32-byte header: u32 command (its low 16 bits;
// the high 16 are flags), 4 bytes of padding, u64 number of pages, u64
// address, u64 destination id. An add with present pages is followed by
// the pages; a get is answered with an add of the pages that follow; a
// close is answered with a 4-byte status.
package pagestream

import "encoding/binary"

// PageSize is the unit of CRIU's page transfers.
const PageSize = 4096

// HeaderLen is the length of a command.
const HeaderLen = 32

// Commands, and the flags an add carries.
const (
	CmdAdd        = 1
	CmdAddF       = 6
	CmdGet        = 7
	CmdClose      = 0x1023
	CmdForceClose = 0x1024

	CmdBits = 16

	FlagPresent = 1 << 2 // PE_PRESENT
)

// StatusLen is the length of the answer to a close.
const StatusLen = 4

// Type bits of a destination id: a task's private memory.
const (
	typeBits = 8
	typePID  = 1
)

// TaskID is the destination id of a task's private memory: its pid in its
// (innermost) pid namespace, shifted over the type bits (criu/page-xfer.c
// encode_pm).
func TaskID(nsPID int) uint64 { return uint64(nsPID)<<typeBits | typePID }

// Header is one command.
type Header struct {
	Cmd   uint32 // with its flags
	Pages uint64
	Addr  uint64
	ID    uint64
}

// Command is the command without its flags; Flags its flags.
func (h Header) Command() uint32 { return h.Cmd & (1<<CmdBits - 1) }
func (h Header) Flags() uint32   { return h.Cmd >> CmdBits }

// ParseHeader reads a command from b, which holds at least HeaderLen bytes.
func ParseHeader(b []byte) Header {
	return Header{
		Cmd:   binary.LittleEndian.Uint32(b[0:]),
		Pages: binary.LittleEndian.Uint64(b[8:]),
		Addr:  binary.LittleEndian.Uint64(b[16:]),
		ID:    binary.LittleEndian.Uint64(b[24:]),
	}
}

// Append appends h as CRIU writes it.
func (h Header) Append(b []byte) []byte {
	b = binary.LittleEndian.AppendUint32(b, h.Cmd)
	b = binary.LittleEndian.AppendUint32(b, 0)
	b = binary.LittleEndian.AppendUint64(b, h.Pages)
	b = binary.LittleEndian.AppendUint64(b, h.Addr)
	return binary.LittleEndian.AppendUint64(b, h.ID)
}

// Gather appends to buf from b until buf holds want bytes, for a command
// or a page that comes in pieces: it returns buf, the rest of b, and
// whether buf is whole.
func Gather(buf []byte, want int, b []byte) ([]byte, []byte, bool) {
	n := min(want-len(buf), len(b))
	buf = append(buf, b[:n]...)
	return buf, b[n:], len(buf) == want
}
