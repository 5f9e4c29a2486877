// Package wire is the protocol between two phauld daemons: frames, the
// messages they carry, and the handshake that opens each connection. It only
// encodes and decodes; what a message means for a migration is decided by
// package session.
//
// A frame is an 8-byte header followed by a payload:
//
//	offset 0  'P' 'H'   magic
//	offset 2  version   protocol version (1)
//	offset 3  type      message type (see Type)
//	offset 4  length    payload length, uint32 big-endian
//
// Each message type has a fixed size limit and the channel (rpc or mem) it
// may travel on; a frame that breaks either is an error that ends the
// connection. docs/protocol.md describes the format in full.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

const (
	// HeaderLen is the size of a frame header.
	HeaderLen = 8
	// Version is the protocol version this package speaks.
	Version = 1
	// MaxPayload is the largest payload of any message type.
	MaxPayload = 1 << 20
	// DataChunk is the payload size senders use for bulk data (page data,
	// image files). Receivers accept anything up to the type's limit.
	DataChunk = 256 << 10
)

var magic = [2]byte{'P', 'H'}

// Errors a decoder returns. All of them mean the peer is not speaking this
// protocol correctly; the connection must be closed.
var (
	ErrMagic    = errors.New("bad frame magic: the peer does not speak the phaul protocol")
	ErrVersion  = errors.New("unsupported protocol version")
	ErrType     = errors.New("unknown message type")
	ErrChannel  = errors.New("message not allowed on this connection")
	ErrTooLarge = errors.New("frame larger than its type allows")
	ErrPayload  = errors.New("malformed message payload")
)

// Header is a decoded frame header.
type Header struct {
	Type Type
	Len  int
}

// PutHeader writes a frame header for a payload of n bytes into b[:HeaderLen].
func PutHeader(b []byte, t Type, n int) {
	b[0], b[1] = magic[0], magic[1]
	b[2] = Version
	b[3] = byte(t)
	binary.BigEndian.PutUint32(b[4:HeaderLen], uint32(n))
}

// AppendHeader appends a frame header for a payload of n bytes to b.
func AppendHeader(b []byte, t Type, n int) []byte {
	var h [HeaderLen]byte
	PutHeader(h[:], t, n)
	return append(b, h[:]...)
}

// ParseHeader decodes and checks a frame header: magic, version, a known
// type that may travel on ch, and a length within the type's limit.
func ParseHeader(b []byte, ch Channel) (Header, error) {
	if len(b) < HeaderLen {
		return Header{}, fmt.Errorf("short header: %d bytes", len(b))
	}
	if b[0] != magic[0] || b[1] != magic[1] {
		return Header{}, ErrMagic
	}
	if b[2] != Version {
		return Header{}, fmt.Errorf("%w %d (this daemon speaks %d)", ErrVersion, b[2], Version)
	}
	t := Type(b[3])
	s := specs[t]
	if s == nil {
		return Header{}, fmt.Errorf("%w 0x%02x", ErrType, byte(t))
	}
	if s.channels&ch == 0 {
		return Header{}, fmt.Errorf("%w: %s on %s", ErrChannel, s.name, ch)
	}
	n := binary.BigEndian.Uint32(b[4:HeaderLen])
	if n > uint32(s.max) {
		return Header{}, fmt.Errorf("%w: %s of %d bytes (limit %d)", ErrTooLarge, s.name, n, s.max)
	}
	return Header{Type: t, Len: int(n)}, nil
}

// Decoder turns a byte stream into messages. It owns a buffer the caller
// reads into (Space, then Commit), so bulk data is not copied on the way.
// A message returned by Next may alias the buffer: it is valid until the
// next call to Space.
type Decoder struct {
	ch   Channel
	buf  []byte
	r, w int
}

// NewDecoder returns a decoder for messages on channel ch, with an initial
// buffer of size bytes. The buffer grows when a frame needs more room.
func NewDecoder(ch Channel, size int) *Decoder {
	if size < HeaderLen {
		size = HeaderLen
	}
	return &Decoder{ch: ch, buf: make([]byte, size)}
}

// Buffered returns how many bytes are buffered but not yet decoded.
func (d *Decoder) Buffered() int { return d.w - d.r }

// Space returns free buffer space to read into; call Commit with the number
// of bytes read. It is never empty.
func (d *Decoder) Space() []byte {
	have := d.w - d.r
	need := HeaderLen
	if have >= HeaderLen {
		if h, err := ParseHeader(d.buf[d.r:d.w], d.ch); err == nil {
			need = HeaderLen + h.Len
		}
	}
	missing := max(need-have, 1)
	if len(d.buf)-d.w < missing && d.r > 0 {
		// Move the partial frame to the front.
		n := copy(d.buf, d.buf[d.r:d.w])
		d.r, d.w = 0, n
	}
	if len(d.buf)-d.w < missing {
		nb := make([]byte, max(2*len(d.buf), d.w+missing))
		copy(nb, d.buf[:d.w])
		d.buf = nb
	}
	return d.buf[d.w:]
}

// Commit records that n bytes were written into the slice Space returned.
func (d *Decoder) Commit(n int) { d.w += n }

// Feed copies p into the decoder. It is Space and Commit for callers that
// already hold the bytes (tests, fuzzing).
func (d *Decoder) Feed(p []byte) {
	for len(p) > 0 {
		n := copy(d.Space(), p)
		d.Commit(n)
		p = p[n:]
	}
}

// Next decodes the next complete message. It returns (nil, nil) when more
// bytes are needed. Any error is final for the stream.
func (d *Decoder) Next() (Message, error) {
	if d.w-d.r < HeaderLen {
		return nil, nil
	}
	h, err := ParseHeader(d.buf[d.r:d.w], d.ch)
	if err != nil {
		return nil, err
	}
	if d.w-d.r < HeaderLen+h.Len {
		return nil, nil
	}
	payload := d.buf[d.r+HeaderLen : d.r+HeaderLen+h.Len]
	d.r += HeaderLen + h.Len
	if d.r == d.w {
		d.r, d.w = 0, 0
	}
	return decode(h.Type, payload)
}

// ReadMessage reads exactly one frame from r and decodes it. It reads no
// byte past the frame, so a connection can be handed on afterwards (the
// handshake uses it before a connection joins a session loop).
func ReadMessage(r io.Reader, ch Channel) (Message, error) {
	var hb [HeaderLen]byte
	if _, err := io.ReadFull(r, hb[:]); err != nil {
		return nil, err
	}
	h, err := ParseHeader(hb[:], ch)
	if err != nil {
		return nil, err
	}
	payload := make([]byte, h.Len)
	if _, err := io.ReadFull(r, payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return decode(h.Type, payload)
}

// WriteMessage writes m as one frame to w.
func WriteMessage(w io.Writer, m Message) error {
	b, err := Marshal(m)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}
