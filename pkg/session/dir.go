//go:build linux

package session

import (
	"os"

	"go.uber.org/zap"

	"github.com/phaul/phaul/pkg/store"
)

// removeAll removes dir, logging (not returning) a failure: a left-over
// directory is untidy, not harmful.
func removeAll(log *zap.Logger, dir string) {
	if err := os.RemoveAll(dir); err != nil {
		log.Warn("cannot remove session directory", zap.String("dir", dir), zap.Error(err))
	}
}

// private takes group and others' access to dir and all it holds (see
// store.Private), logging a failure.
func private(log *zap.Logger, dir string) {
	if err := store.Private(dir); err != nil {
		log.Warn("cannot make the session's files private", zap.String("dir", dir), zap.Error(err))
	}
}
