//go:build linux

package migrate

import (
	"os"

	"github.com/phaul/phaul/pkg/loop"
	"github.com/phaul/phaul/pkg/transport"
	"github.com/phaul/phaul/pkg/wire"
)

// conns are a migration's two connections on its session's loop, and the
// relay of its page stream once there is one.
type conns struct {
	rpc, mem *transport.Conn
	relay    *transport.Relay
	// codec compresses the page stream and images, when the two sides
	// agreed to (--compress); nil otherwise.
	codec *transport.Codec
}

// open puts rpcLink and memLink on l. Messages on rpc go to onRPC, and an
// error there aborts the migration by the commit rule (telling the peer
// why) rather than just dropping the connection; page data on mem goes to
// the relay, once there is one, and bad page data aborts likewise; a
// failure of either connection goes to onClose. On error both links are closed.
func (c *conns) open(l *loop.Loop, rpcLink, memLink *transport.Link, onRPC func(wire.Message) error, abort, onClose func(error)) error {
	var err error
	if c.rpc, err = transport.NewConn(l, "rpc", rpcLink, wire.RPC, 64<<10); err != nil {
		rpcLink.Close()
		memLink.Close()
		return err
	}
	if c.mem, err = transport.NewConn(l, "mem", memLink, wire.Mem, 4<<20); err != nil {
		c.rpc.Close()
		memLink.Close()
		return err
	}
	c.rpc.OnMessage = func(msg wire.Message) error {
		if err := onRPC(msg); err != nil {
			abort(err)
		}
		return nil
	}
	c.rpc.OnClose, c.mem.OnClose = onClose, onClose
	c.mem.OnMessage = func(msg wire.Message) error {
		// Bad page data is the peer breaking the protocol, not a lost
		// connection: abort by the rule, telling the peer why.
		if c.relay == nil {
			abort(protocolErr("page data before the page stream began"))
			return nil
		}
		if err := c.relay.FromPeer(msg); err != nil {
			abort(protocolErr("%v", err))
		}
		return nil
	}
	return nil
}

// openRelay opens the relay of the page stream (see transport.OpenRelay),
// compressing if the sides agreed to.
func (c *conns) openRelay(l *loop.Loop, tcp bool, onError func(error)) (*os.File, error) {
	relay, theirs, err := transport.OpenRelay(l, c.mem, tcp, onError)
	if err != nil {
		return nil, err
	}
	relay.Codec = c.codec
	c.relay = relay
	return theirs, nil
}

// fileData decodes an image chunk: FileData as is, FileDataZ
// decompressed (only if compression was agreed).
func (c *conns) fileData(msg wire.Message) ([]byte, error) {
	switch msg := msg.(type) {
	case *wire.FileData:
		return msg.Data, nil
	case *wire.FileDataZ:
		if c.codec == nil {
			return nil, protocolErr("compressed image data, but no compression was agreed")
		}
		b, err := c.codec.Decompress(msg.Data)
		if err != nil {
			return nil, protocolErr("image data: %v", err)
		}
		return b, nil
	}
	return nil, protocolErr("%s is not image data", msg.Type())
}

// bytes is what crossed both connections.
func (c *conns) bytes() int64 {
	return c.rpc.BytesOut() + c.rpc.BytesIn() + c.mem.BytesOut() + c.mem.BytesIn()
}

// close closes the relay and both connections, after flushing what the
// rpc connection can take now (a final Done or Fail) without blocking,
// and without its pacer.
func (c *conns) close() {
	if c.relay != nil {
		c.relay.Close()
	}
	c.rpc.SetPacer(nil) // a last word is never held back
	c.rpc.Flush()
	c.rpc.Close()
	c.mem.Close()
	c.codec.Close()
}
