package transport

import (
	"fmt"

	"github.com/klauspost/compress/zstd"

	"github.com/phaul/phaul/pkg/wire"
)

// minCompress is the smallest chunk worth compressing: below it (a lazy
// page request, say) the frame goes as is.
const minCompress = 512

// Codec compresses the chunks of a migration's page stream and images
// with zstd, each chunk a frame of its own, so that a chunk decodes
// alone. It belongs to one session's loop.
type Codec struct {
	enc *zstd.Encoder
	dec *zstd.Decoder
	out []byte // what Decompress returned last
}

// NewCodec returns a codec at zstd's fastest level: the page stream must
// keep up with a fast link on one core.
func NewCodec() (*Codec, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1),
		zstd.WithZeroFrames(true), zstd.WithEncoderCRC(false))
	if err != nil {
		return nil, err
	}
	// A frame from the peer never decodes to more than a chunk: a
	// larger one is refused before it is decoded.
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(wire.DataChunk),
		zstd.WithDecoderMaxWindow(wire.DataChunk))
	if err != nil {
		enc.Close()
		return nil, err
	}
	return &Codec{enc: enc, dec: dec}, nil
}

// Compress appends src, compressed, to dst and returns it; or nil if
// compressing does not make src smaller (it then goes as is).
func (c *Codec) Compress(dst, src []byte) []byte {
	if len(src) < minCompress {
		return nil
	}
	z := c.enc.EncodeAll(src, dst)
	if len(z)-len(dst) >= len(src) {
		return nil
	}
	return z
}

// Decompress decodes one frame the peer compressed. What it returns is
// valid until the next call.
func (c *Codec) Decompress(src []byte) ([]byte, error) {
	out, err := c.dec.DecodeAll(src, c.out[:0])
	if err != nil {
		return nil, fmt.Errorf("compressed chunk: %w", err)
	}
	if len(out) > wire.DataChunk {
		return nil, fmt.Errorf("compressed chunk decodes to %d bytes, over the %d-byte chunk", len(out), wire.DataChunk)
	}
	c.out = out
	return out, nil
}

// Close lets the codec's resources go.
func (c *Codec) Close() {
	if c == nil {
		return
	}
	c.enc.Close()
	c.dec.Close()
}
