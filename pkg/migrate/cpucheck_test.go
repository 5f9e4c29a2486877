package migrate

import "testing"

func TestCPUChecks(t *testing.T) {
	c := NewCPUChecks()
	a, b := []byte("cpuinfo of host A"), []byte("cpuinfo of host B")
	if _, ok := c.lookup(a); ok {
		t.Fatal("an empty cache found a result")
	}
	c.remember(a, "ok")
	if r, ok := c.lookup(a); !ok || r != "ok" {
		t.Fatalf("lookup(a) = %q, %v; want ok", r, ok)
	}
	if _, ok := c.lookup(b); ok {
		t.Fatal("another image found a's result")
	}
	var none *CPUChecks
	none.remember(a, "ok")
	if _, ok := none.lookup(a); ok {
		t.Fatal("a nil cache remembers")
	}
}
