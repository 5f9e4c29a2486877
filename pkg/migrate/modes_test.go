package migrate

import (
	"strings"
	"testing"

	"github.com/phaul/phaul/pkg/api"
)

func TestChooseMode(t *testing.T) {
	allS := Capabilities{api.ModeCopy: "", api.ModeLazy: "", api.ModePrecopy: ""}
	_, allD := HostCapabilities(true, "")
	hereS, hereD := HostCapabilities(true, "")
	_, noUffdD := HostCapabilities(false, "")
	pipesS, _ := HostCapabilities(true, "fs.pipe-max-size is 1048576")
	oldS := Capabilities{api.ModeCopy: "", api.ModeLazy: "", api.ModePrecopy: "its phauld says it cannot"}
	for _, tc := range []struct {
		req      string
		src, dst Capabilities
		want     string // mode, or part of the error
	}{
		{"", allS, allD, api.ModeLazy},
		{api.ModeAuto, hereS, hereD, api.ModeLazy},
		{api.ModeAuto, allS, noUffdD, api.ModePrecopy},
		{api.ModeAuto, hereS, noUffdD, api.ModePrecopy}, // no soft-dirty needed
		{api.ModeAuto, oldS, noUffdD, api.ModeCopy},
		{api.ModeAuto, pipesS, hereD, api.ModePrecopy},
		{api.ModeCopy, hereS, noUffdD, api.ModeCopy},
		{api.ModePrecopy, hereS, hereD, api.ModePrecopy},
		{api.ModePrecopy, oldS, allD, "on the source, its phauld says it cannot"},
		{api.ModeLazy, hereS, noUffdD, "on the destination, CRIU finds no usable userfaultfd"},
		{api.ModeLazy, pipesS, hereD, "on the source, fs.pipe-max-size is 1048576"},
		{"turbo", allS, allD, `unknown mode "turbo"`},
	} {
		got, err := chooseMode(tc.req, tc.src, tc.dst)
		if err != nil {
			got = err.Error()
		}
		if !strings.Contains(got, tc.want) {
			t.Errorf("chooseMode(%q, %v, %v) = %q, want %q", tc.req, tc.src, tc.dst, got, tc.want)
		}
	}
	// No kernel dirty tracking is needed: phauld compares by content.
	if !hereS.Can(api.ModePrecopy) || !hereD.Can(api.ModePrecopy) {
		t.Errorf("pre-copy here: as a source %q, as a destination %q; want both", hereS[api.ModePrecopy], hereD[api.ModePrecopy])
	}
	// A named mode the hosts cannot run says what to do.
	_, err := chooseMode(api.ModePrecopy, oldS, hereD)
	if api.CodeOf(err) != api.CodePrecondition || !strings.Contains(err.Error(), "--mode auto") {
		t.Errorf("precopy from an old source: %v", err)
	}
}

// TestAutoWeighsTheLink: auto takes pre-copy where the measured link is
// slow for the memory, lazy otherwise (fast, small, or not measured),
// and never a mode one side cannot run.
func TestAutoWeighsTheLink(t *testing.T) {
	hereS, hereD := HostCapabilities(true, "")
	oldD := Capabilities{api.ModeCopy: "", api.ModeLazy: "", api.ModePrecopy: "its phauld does not know this mode"}
	const MB = 1 << 20
	for _, tc := range []struct {
		name      string
		dst       Capabilities
		rate, mem int64
		want      string
	}{
		{"1 Gbit/s, 512 MiB", hereD, 118 * MB, 512 * MB, api.ModePrecopy},
		{"1 Gbit/s, 64 MiB: half a second", hereD, 118 * MB, 64 * MB, api.ModeLazy},
		{"loopback, 4 GiB", hereD, 600 * MB, 4096 * MB, api.ModeLazy},
		{"not measured", hereD, 0, 4096 * MB, api.ModeLazy},
		{"slow, but the destination cannot pre-copy", oldD, 20 * MB, 512 * MB, api.ModeLazy},
	} {
		got, why, err := chooseModeOn(api.ModeAuto, hereS, tc.dst, tc.rate, tc.mem)
		if err != nil || got != tc.want || why == "" {
			t.Errorf("%s: %q (%s), %v; want %q", tc.name, got, why, err, tc.want)
		}
	}
	// A named mode is not weighed.
	if got, _, _ := chooseModeOn(api.ModeCopy, hereS, hereD, 1*MB, 4096*MB); got != api.ModeCopy {
		t.Errorf("copy on a slow link: %q", got)
	}
}
