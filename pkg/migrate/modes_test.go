package migrate

import (
	"strings"
	"testing"

	"github.com/phaul/phaul/pkg/api"
)

func TestChooseMode(t *testing.T) {
	// A source that could pre-copy (once rounds exist).
	allS := Capabilities{api.ModeCopy: "", api.ModeLazy: "", api.ModePrecopy: ""}
	_, allD := HostCapabilities(true, true, "")
	hereS, hereD := HostCapabilities(false, true, "") // these machines: no soft-dirty
	_, noUffdD := HostCapabilities(true, false, "")
	pipesS, _ := HostCapabilities(false, true, "fs.pipe-max-size is 1048576")
	for _, tc := range []struct {
		req      string
		src, dst Capabilities
		want     string // mode, or part of the error
	}{
		{"", allS, allD, api.ModeLazy},
		{api.ModeAuto, hereS, hereD, api.ModeLazy},
		{api.ModeAuto, allS, noUffdD, api.ModePrecopy},
		{api.ModeAuto, hereS, noUffdD, api.ModeCopy},
		{api.ModeAuto, pipesS, hereD, api.ModeCopy},
		{api.ModeCopy, hereS, noUffdD, api.ModeCopy},
		{api.ModePrecopy, allS, hereD, api.ModePrecopy}, // only the source pre-dumps
		{api.ModePrecopy, hereS, allD, "on the source, this kernel has no soft-dirty memory tracking"},
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
	// With soft-dirty tracking, pre-copy is still refused, saying why,
	// and auto does not pick it.
	sdS, sdD := HostCapabilities(true, true, "")
	if _, err := chooseMode(api.ModePrecopy, sdS, sdD); err == nil || !strings.Contains(err.Error(), "pre-copy rounds yet") {
		t.Errorf("precopy with soft-dirty: %v; want refused until rounds exist", err)
	}
	if got, _ := chooseMode(api.ModeAuto, sdS, noUffdD); got != api.ModeCopy {
		t.Errorf("auto with soft-dirty, no userfaultfd = %q, want copy", got)
	}
	// A named mode the hosts cannot run says what to do.
	_, err := chooseMode(api.ModePrecopy, hereS, hereD)
	if api.CodeOf(err) != api.CodePrecondition || !strings.Contains(err.Error(), "--mode auto") {
		t.Errorf("precopy here: %v", err)
	}
}
