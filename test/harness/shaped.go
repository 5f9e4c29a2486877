//go:build linux

package harness

import (
	"fmt"
	"os"
	"os/exec"
)

// ShapedLink makes two network namespaces, nsA and nsB, standing for two
// hosts on a slow link: a veth between them whose ends have addrA and
// addrB (ADDR/PREFIX), each shaped to rate with burst (tbf, 50 ms of
// queue), lo up in both. remove deletes the namespaces (the veth and its
// qdiscs go with them); on an error nothing is left.
func ShapedLink(nsA, nsB, addrA, addrB, rate, burst string) (remove func(), err error) {
	seq := labSeq.Add(1)
	vA, vB := fmt.Sprintf("phs%da%d", os.Getpid()%100000, seq), fmt.Sprintf("phs%db%d", os.Getpid()%100000, seq)
	remove = func() {
		exec.Command("ip", "netns", "del", nsA).Run()
		exec.Command("ip", "netns", "del", nsB).Run()
	}
	steps := [][]string{
		{"ip", "netns", "add", nsA},
		{"ip", "netns", "add", nsB},
		{"ip", "link", "add", vA, "netns", nsA, "type", "veth", "peer", "name", vB, "netns", nsB},
		{"ip", "-n", nsA, "addr", "add", addrA, "dev", vA},
		{"ip", "-n", nsB, "addr", "add", addrB, "dev", vB},
	}
	for _, x := range []struct{ ns, dev string }{{nsA, vA}, {nsB, vB}} {
		steps = append(steps,
			[]string{"ip", "-n", x.ns, "link", "set", x.dev, "up"},
			[]string{"ip", "-n", x.ns, "link", "set", "lo", "up"},
			[]string{"tc", "-n", x.ns, "qdisc", "add", "dev", x.dev, "root", "tbf", "rate", rate, "burst", burst, "latency", "50ms"})
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			remove()
			return nil, err
		}
	}
	return remove, nil
}
