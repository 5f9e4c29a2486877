package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// rateFlag is --bwlimit: a rate in bytes a second, given as bytes with a
// binary suffix (K, M, G: KiB/s, MiB/s, GiB/s; "B", "iB" and "/s" may
// follow) or as bits with a decimal one (kbit, mbit, gbit).
type rateFlag int64

func (r *rateFlag) String() string {
	if *r == 0 {
		return ""
	}
	return rateHuman(int64(*r))
}

func (r *rateFlag) Set(v string) error {
	n, err := parseRate(v)
	if err != nil {
		return err
	}
	*r = rateFlag(n)
	return nil
}

func (r *rateFlag) Type() string { return "RATE" }

// parseRate reads a rate (see rateFlag) as bytes a second.
func parseRate(v string) (int64, error) {
	s := strings.ToLower(strings.TrimSpace(v))
	s = strings.TrimSuffix(s, "/s")
	mult := 1.0
	for _, u := range []struct {
		suffix string
		mult   float64
	}{
		{"gbit", 1e9 / 8}, {"mbit", 1e6 / 8}, {"kbit", 1e3 / 8},
		{"gib", 1 << 30}, {"mib", 1 << 20}, {"kib", 1 << 10},
		{"gb", 1 << 30}, {"mb", 1 << 20}, {"kb", 1 << 10},
		{"g", 1 << 30}, {"m", 1 << 20}, {"k", 1 << 10}, {"b", 1},
	} {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSuffix(s, u.suffix), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil || f <= 0 || math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, fmt.Errorf("rate %q: want a number of bytes a second with K, M or G (binary: 8M is 8 MiB/s), or of bits with kbit, mbit or gbit (100mbit)", v)
	}
	b := f * mult
	if b > math.MaxInt64/2 {
		return 0, fmt.Errorf("rate %q is too large", v)
	}
	return int64(b), nil
}

// rateHuman shows bytes a second as MiB/s and as Mbit/s.
func rateHuman(n int64) string {
	return fmt.Sprintf("%s/s (%.0f Mbit/s)", bytesHuman(n), float64(n)*8/1e6)
}
