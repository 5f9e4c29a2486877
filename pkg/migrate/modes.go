package migrate

import (
	"fmt"
	"strings"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/criu"

	"github.com/phaul/phaul/pkg/api"
)

// Capabilities are the migration modes a host can take part in: for each
// mode, "" if it can, else why not (said to the user as is).
type Capabilities map[string]string

// Can reports whether the host can run mode.
func (c Capabilities) Can(mode string) bool {
	why, ok := c[mode]
	return ok && why == ""
}

// HostCapabilities are what this host's CRIU and kernel allow it to do
// as a source (asSource) and as a destination (asDest). A lazy source
// serves pages from pipes (fs.pipe-max-size: pipeBlock, if not "", says
// why it cannot); a lazy destination needs userfaultfd (CRIU's lazy_pages
// check). Pre-copy needs nothing of the kernel: phauld finds the pages
// that changed by their content (pkg/precopy), so soft-dirty tracking
// (which CRIU's own pre-dumps would need) does not matter.
func HostCapabilities(lazyPages bool, pipeBlock string) (asSource, asDest Capabilities) {
	asSource = Capabilities{api.ModeCopy: "", api.ModeLazy: pipeBlock, api.ModePrecopy: ""}
	asDest = Capabilities{api.ModeCopy: "", api.ModeLazy: "", api.ModePrecopy: ""}
	if !lazyPages {
		asDest[api.ModeLazy] = "CRIU finds no usable userfaultfd on this host (its lazy_pages feature check failed)"
	}
	return asSource, asDest
}

// chooseMode resolves requested (a mode or auto) against what the source
// and the destination can do, as the destination decides it: auto is the
// best both support (lazy, else precopy, else copy). A named mode one side
// cannot run is refused with that side's reason and what to do.
func chooseMode(requested string, src, dst Capabilities) (string, error) {
	mode, _, err := chooseModeOn(requested, src, dst, 0, 0)
	return mode, err
}

// chooseModeOn is chooseMode knowing the link's measured rate and the
// tree's memory (0: unknown), which auto weighs (autoMode); why says why
// auto chose as it did.
func chooseModeOn(requested string, src, dst Capabilities, rate, mem int64) (mode, why string, err error) {
	if requested == "" {
		requested = api.ModeAuto
	}
	if requested == api.ModeAuto {
		if m, why := autoMode(src, dst, rate, mem); m != "" {
			return m, why, nil
		}
		return "", "", api.Errorf(api.CodePrecondition, "the two hosts share no migration mode (source: %v; destination: %v)", src, dst)
	}
	if _, known := dst[requested]; !known {
		if _, known := src[requested]; !known {
			return "", "", api.Errorf(api.CodeInvalid, "unknown mode %q: want copy, lazy, precopy or auto", requested)
		}
	}
	for _, side := range []struct {
		name string
		caps Capabilities
	}{{"source", src}, {"destination", dst}} {
		if !side.caps.Can(requested) {
			why := side.caps[requested]
			if why == "" {
				why = "its phauld does not know this mode (upgrade it)"
			}
			return "", "", api.Errorf(api.CodePrecondition, "%s migration impossible: on the %s, %s. Use --mode auto (or copy)", requested, side.name, why)
		}
	}
	return requested, "asked for", nil
}

// String lists the modes a host can run, for logs.
func (c Capabilities) String() string {
	s := ""
	for _, m := range []string{api.ModeCopy, api.ModeLazy, api.ModePrecopy} {
		if s != "" {
			s += ", "
		}
		if c.Can(m) {
			s += m + " yes"
		} else {
			s += fmt.Sprintf("%s no", m)
		}
	}
	return s
}

// ModeSupport says, per mode, whether this host can run it on either
// side: "" if it can, else why not.
func ModeSupport(asSource, asDest Capabilities) map[string]string {
	out := map[string]string{}
	for _, m := range []string{api.ModeCopy, api.ModeLazy, api.ModePrecopy} {
		var why []string
		if !asSource.Can(m) {
			why = append(why, "as a source: "+asSource[m])
		}
		if !asDest.Can(m) {
			why = append(why, "as a destination: "+asDest[m])
		}
		out[m] = strings.Join(why, "; ")
	}
	return out
}

// DetectModes finds the modes this host can run from what probing CRIU
// found, and makes lazy dumps possible: they keep pages in pipes larger
// than the kernel's default limit allows, so fs.pipe-max-size is raised
// (host-wide) to criu.LazyPipeSize when it is lower.
func DetectModes(info criu.Info, log *zap.Logger) (asSource, asDest Capabilities) {
	pipeBlock := ""
	if was, err := criu.EnsurePipeMaxSize(criu.LazyPipeSize); err != nil {
		pipeBlock = fmt.Sprintf("fs.pipe-max-size is below the %d bytes lazy dumps need, and phauld could not raise it (%v): run 'sysctl -w fs.pipe-max-size=%d'",
			criu.LazyPipeSize, err, criu.LazyPipeSize)
		log.Warn("lazy migrations from this host are off", zap.Error(err))
	} else if was < criu.LazyPipeSize {
		log.Info("raised fs.pipe-max-size for CRIU's lazy pages", zap.Int("was", was), zap.Int("now", criu.LazyPipeSize))
	}
	asSource, asDest = HostCapabilities(info.Features.LazyPages, pipeBlock)
	log.Info("migration modes", zap.Stringer("as_source", asSource), zap.Stringer("as_destination", asDest))
	return asSource, asDest
}
