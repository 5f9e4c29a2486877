package wire

import (
	"bytes"
	"reflect"
	"testing"
)

// FuzzDecoder feeds arbitrary bytes to a decoder on each channel. It must
// never panic, never return a message without consuming its frame, and every
// message it returns must encode back to a frame that decodes to the same
// message.
func FuzzDecoder(f *testing.F) {
	for _, m := range sampleMessages() {
		b, _ := Marshal(m)
		f.Add(b, uint8(channelOf(m)), uint16(3))
	}
	f.Add([]byte("PH\x01\x30\xff\xff\xff\xff"), uint8(Mem), uint16(1))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), uint8(Handshake), uint16(5))
	f.Fuzz(func(t *testing.T, data []byte, chByte uint8, split uint16) {
		ch := Channel(1 << (chByte % 4))
		d := NewDecoder(ch, 32)
		step := int(split)%97 + 1
		for off := 0; off < len(data); off += step {
			d.Feed(data[off:min(len(data), off+step)])
			for {
				m, err := d.Next()
				if err != nil || m == nil {
					break
				}
				checkReencode(t, m, ch)
			}
		}
		// ReadMessage must agree with the decoder on the first frame.
		m1, err1 := ReadMessage(bytes.NewReader(data), ch)
		d2 := NewDecoder(ch, 32)
		d2.Feed(data)
		m2, err2 := d2.Next()
		if (err1 == nil) != (err2 == nil && m2 != nil) {
			t.Fatalf("ReadMessage (%v, %v) and Decoder (%v, %v) disagree", m1, err1, m2, err2)
		}
	})
}

func checkReencode(t *testing.T, m Message, ch Channel) {
	t.Helper()
	b, err := Marshal(m)
	if err != nil {
		t.Fatalf("decoded %T does not encode: %v", m, err)
	}
	d := NewDecoder(ch, 16)
	d.Feed(b)
	again, err := d.Next()
	if err != nil || again == nil {
		t.Fatalf("re-encoded %T does not decode: %v", m, err)
	}
	if !reflect.DeepEqual(normalize(m), normalize(again)) {
		t.Fatalf("re-decoded %T differs: %+v vs %+v", m, m, again)
	}
}

// normalize maps empty and nil byte slices to the same value.
func normalize(m Message) Message {
	switch v := m.(type) {
	case *PageData:
		if len(v.Data) == 0 {
			return &PageData{}
		}
	case *FileData:
		if len(v.Data) == 0 {
			return &FileData{}
		}
	case *Prepare:
		c := *v
		if len(c.CPUInfo) == 0 {
			c.CPUInfo = nil
		}
		return &c
	}
	return m
}
