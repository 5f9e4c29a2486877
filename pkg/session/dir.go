//go:build linux

package session

import (
	"os"

	"go.uber.org/zap"
)

// removeAll removes dir, logging (not returning) a failure: a left-over
// directory is untidy, not harmful.
func removeAll(log *zap.Logger, dir string) {
	if err := os.RemoveAll(dir); err != nil {
		log.Warn("cannot remove session directory", zap.String("dir", dir), zap.Error(err))
	}
}
