//go:build linux

package runc

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// Config is a bundle's config.json, kept whole (phaul rewrites a few
// fields and must not lose the rest).
type Config map[string]any

// LoadConfig reads the config.json of bundle.
func LoadConfig(bundle string) (Config, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, err
	}
	return ParseConfig(b)
}

// ParseConfig reads a config.json.
func ParseConfig(b []byte) (Config, error) {
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("config.json: %w", err)
	}
	if c == nil {
		return nil, fmt.Errorf("config.json: not an object")
	}
	return c, nil
}

// Marshal is the config as config.json.
func (c Config) Marshal() ([]byte, error) { return json.MarshalIndent(c, "", "\t") }

func (c Config) object(key string) map[string]any {
	m, _ := c[key].(map[string]any)
	if m == nil {
		m = map[string]any{}
		c[key] = m
	}
	return m
}

// Rootfs is the root filesystem's path, absolute (a relative one is
// relative to bundle).
func (c Config) Rootfs(bundle string) string {
	p, _ := c.object("root")["path"].(string)
	if p == "" {
		p = "rootfs"
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(bundle, p)
	}
	return p
}

// SetRootfs sets the root filesystem's path.
func (c Config) SetRootfs(path string) { c.object("root")["path"] = path }

// CgroupsPath is linux.cgroupsPath ("" when unset).
func (c Config) CgroupsPath() string {
	p, _ := c.object("linux")["cgroupsPath"].(string)
	return p
}

// SetCgroupsPath sets linux.cgroupsPath.
func (c Config) SetCgroupsPath(p string) { c.object("linux")["cgroupsPath"] = p }

// SetAnnotation sets an annotation.
func (c Config) SetAnnotation(key, value string) {
	c.object("annotations")[key] = value
}

// BindSources are the host paths the container's bind mounts take.
func (c Config) BindSources() []string {
	mounts, _ := c["mounts"].([]any)
	var out []string
	for _, m := range mounts {
		mm, _ := m.(map[string]any)
		src, _ := mm["source"].(string)
		typ, _ := mm["type"].(string)
		bind := typ == "bind"
		opts, _ := mm["options"].([]any)
		for _, o := range opts {
			if s, _ := o.(string); s == "bind" || s == "rbind" {
				bind = true
			}
		}
		if bind && src != "" {
			out = append(out, src)
		}
	}
	return out
}
