//go:build linux

package criu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// Version is a CRIU version.
type Version struct {
	Major, Minor, Sublevel int
	// GitID is set for builds from git rather than a release.
	GitID string
}

// Code is the version as one comparable number: major*10000 + minor*100 +
// sublevel.
func (v Version) Code() int { return v.Major*10000 + v.Minor*100 + v.Sublevel }

func (v Version) String() string {
	s := fmt.Sprintf("%d.%d", v.Major, v.Minor)
	if v.Sublevel != 0 {
		s += fmt.Sprintf(".%d", v.Sublevel)
	}
	if v.GitID != "" {
		s += " (" + v.GitID + ")"
	}
	return s
}

// VersionFromCode is the inverse of Version.Code.
func VersionFromCode(code int) Version {
	return Version{Major: code / 10000, Minor: code / 100 % 100, Sublevel: code % 100}
}

// MinVersion is the oldest CRIU phaul works with: 4.2 is the first that
// dumps inet sockets on kernels >= 6.16.
var MinVersion = Version{Major: 4, Minor: 2}

// Features are the optional CRIU features that depend on the kernel.
type Features struct {
	// MemTrack: soft-dirty memory tracking, needed for pre-copy.
	MemTrack bool `json:"mem_track"`
	// LazyPages: userfaultfd, needed for post-copy.
	LazyPages bool `json:"lazy_pages"`
	// PidfdStore: pidfd_open and pidfd_getfd.
	PidfdStore bool `json:"pidfd_store"`
}

// Info is what Probe learned about CRIU on this host.
type Info struct {
	Path     string
	Version  Version
	Features Features
	// CPUInfo is this host's cpuinfo.img, for a peer's cpuinfo check. Nil
	// if CRIU could not write one.
	CPUInfo []byte
}

// Probe checks that CRIU works on this host and describes it: it asks
// CRIU's version, its kernel-dependent features, this host's CPU
// description, and runs CRIU's own check. dir is a scratch directory for
// CRIU's logs and the cpuinfo image. It fails if CRIU is older than
// MinVersion or its check fails.
func (c *Client) Probe(ctx context.Context, dir string) (Info, error) {
	info := Info{Path: c.path}
	op, err := c.start("version", nil, request(rpc.CriuReqType_VERSION, nil, true))
	if err != nil {
		return info, err
	}
	defer op.Close()

	resp, err := op.await(ctx)
	if err != nil {
		return info, err
	}
	v := resp.GetVersion()
	info.Version = Version{
		Major:    int(v.GetMajorNumber()),
		Minor:    int(v.GetMinorNumber()),
		Sublevel: int(v.GetSublevel()),
		GitID:    v.GetGitid(),
	}
	if info.Version.Code() < MinVersion.Code() {
		return info, fmt.Errorf("%s is CRIU %s; phaul needs CRIU >= %s (run 'make criu', or pass --criu PATH)",
			c.path, info.Version, MinVersion)
	}

	op.kind = "feature-check"
	op.pending = rpc.CriuReqType_FEATURE_CHECK
	if err := op.send(&rpc.CriuReq{
		Type:     rpc.CriuReqType_FEATURE_CHECK.Enum(),
		KeepOpen: proto.Bool(true),
		Features: &rpc.CriuFeatures{
			MemTrack:   proto.Bool(true),
			LazyPages:  proto.Bool(true),
			PidfdStore: proto.Bool(true),
		},
	}); err != nil {
		return info, err
	}
	if resp, err = op.await(ctx); err != nil {
		return info, err
	}
	// go-criu's FeatureCheck returns its argument; the answer is in the
	// response.
	f := resp.GetFeatures()
	info.Features = Features{MemTrack: f.GetMemTrack(), LazyPages: f.GetLazyPages(), PidfdStore: f.GetPidfdStore()}

	o := &Options{ImagesDir: dir, LogFile: "cpuinfo-dump.log"}
	op.kind, op.dir, op.logFile = "cpuinfo-dump", dir, o.LogFile
	op.pending = rpc.CriuReqType_CPUINFO_DUMP
	if err := op.send(request(rpc.CriuReqType_CPUINFO_DUMP, o, true)); err != nil {
		return info, err
	}
	if _, err := op.await(ctx); err != nil {
		var ce *Error
		if !errors.As(err, &ce) || ce.Errno != unix.ENOTSUP {
			return info, err
		}
	} else if b, err := os.ReadFile(filepath.Join(dir, "cpuinfo.img")); err == nil {
		info.CPUInfo = b
	}

	o = &Options{ImagesDir: dir, LogFile: "check.log"}
	op.kind, op.logFile = "check", o.LogFile
	op.pending = rpc.CriuReqType_CHECK
	if err := op.send(request(rpc.CriuReqType_CHECK, o, false)); err != nil {
		return info, err
	}
	if _, err := op.await(ctx); err != nil {
		return info, fmt.Errorf("CRIU does not work on this host: %w", err)
	}
	return info, nil
}

// await blocks until op's next response, or ctx ends. Notifications are
// not expected by the requests it is used for.
func (op *Op) await(ctx context.Context) (*rpc.CriuResp, error) {
	for {
		ev, err := op.Next()
		if err == nil {
			if ev.Notify != "" {
				return nil, fmt.Errorf("criu %s: unexpected notification %q", op.kind, ev.Notify)
			}
			if ev.Err != nil {
				return nil, ev.Err
			}
			return op.last, nil
		}
		if !errors.Is(err, ErrAgain) {
			return nil, err
		}
		wait := 100 * time.Millisecond
		if d, ok := ctx.Deadline(); ok && time.Until(d) < wait {
			wait = max(time.Until(d), time.Millisecond)
		}
		fds := []unix.PollFd{{Fd: int32(op.sk), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, int(wait/time.Millisecond)); err != nil && err != unix.EINTR {
			return nil, fmt.Errorf("criu %s: poll: %w", op.kind, err)
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("criu %s: %w", op.kind, err)
		}
	}
}
