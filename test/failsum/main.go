// Command failsum reads `go test -json` on its standard input, prints the
// tests' output as `go test -v` would, and at the end prints again, whole,
// the output of every test that failed: in a long parallel run a failing
// test's own lines are scattered among hundreds of others, and a CI log
// cut to its head and tail would lose them. It exits 1 if any test or
// package failed, or if the stream ended before every package it started
// had passed. With -q it prints, as it goes, only the packages' own lines
// (ok, FAIL), as `go test` without -v would.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
)

type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

func main() {
	os.Exit(run())
}

func run() int {
	quiet := flag.Bool("q", false, "print as it goes only the packages' own lines")
	flag.Parse()
	out := map[string]*strings.Builder{} // by package and test
	var failed []string
	started, passed := map[string]bool{}, map[string]bool{}
	bad := false
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		var e event
		if !strings.HasPrefix(line, "{") || json.Unmarshal([]byte(line), &e) != nil {
			// Not go test's JSON (a build error on stderr, say).
			fmt.Println(line)
			continue
		}
		key := e.Package + " " + e.Test
		switch e.Action {
		case "start":
			started[e.Package] = true
		case "output", "build-output":
			if !*quiet || e.Test == "" {
				fmt.Print(e.Output)
			}
			if e.Test != "" {
				b := out[key]
				if b == nil {
					b = &strings.Builder{}
					out[key] = b
				}
				b.WriteString(e.Output)
			}
		case "fail", "build-fail":
			bad = true
			if e.Test != "" {
				failed = append(failed, key)
			}
		case "pass", "skip":
			if e.Test == "" {
				passed[e.Package] = true
			}
		}
	}
	for p := range started {
		if !passed[p] {
			bad = true
		}
	}
	if len(failed) > 0 {
		fmt.Printf("\n=== %d failed tests, each with its own output ===\n", len(failed))
		slices.Sort(failed)
		for _, k := range failed {
			fmt.Printf("\n--- %s\n", k)
			if b := out[k]; b != nil {
				fmt.Print(b.String())
			}
		}
		for _, k := range failed {
			fmt.Println("FAILED:", k)
		}
	}
	if bad {
		return 1
	}
	return 0
}
