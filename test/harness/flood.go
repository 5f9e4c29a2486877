package harness

import (
	"io"
	"net"
	"sync"
	"time"
)

// Flood holds n TCP connections open to addr from the local address
// from, each begun by open (nil: nothing sent), until the returned stop
// is called. With reopen, a connection the daemon closes is opened again
// at once, as an attacker would; without, it stays closed.
func Flood(from, addr string, n int, reopen bool, open func(net.Conn)) (stop func()) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	done := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := d.Dial("tcp", addr)
				if err != nil {
					select {
					case <-done:
						return
					case <-time.After(10 * time.Millisecond):
						continue
					}
				}
				if open != nil {
					open(c)
				}
				closed := make(chan struct{})
				go func() { io.Copy(io.Discard, c); close(closed) }()
				select {
				case <-done:
					c.Close()
					<-closed
					return
				case <-closed:
					c.Close()
				}
				if !reopen {
					<-done
					return
				}
			}
		}()
	}
	return func() { close(done); wg.Wait() }
}
