package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
)

// convertedFromKey marks our entry in a conflist that Install made out of a single-plugin
// config file; its value is that file's name, so Uninstall can put it back. The key lives
// in our own entry, the one place in the file that is ours to write; the plugin ignores
// config fields it does not know.
const convertedFromKey = "sluiceConvertedFrom"

// netConf is a parsed CNI config file. Everything is kept as raw JSON so that fields we do
// not know, and numbers too large for float64, come back out exactly as they went in.
type netConf struct {
	top     map[string]json.RawMessage
	plugins []json.RawMessage // nil for a single-plugin file
}

// isList reports whether the file has a conflist's shape; ext decides how the runtime
// reads it, the same way libcni's callers do: ".conflist" is a list, anything else is a
// single plugin.
func isList(path string) bool { return filepath.Ext(path) == ".conflist" }

// parseNetConf parses data the way the runtime would read a file of that name, and
// rejects what the runtime would skip.
func parseNetConf(data []byte, list bool) (*netConf, error) {
	nc := &netConf{}
	if err := json.Unmarshal(data, &nc.top); err != nil {
		return nil, fmt.Errorf("not a JSON object: %w", err)
	}
	if nc.top == nil {
		return nil, errors.New("not a JSON object")
	}
	if !list {
		var t struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(data, &t); err != nil || t.Type == "" {
			return nil, errors.New(`no plugin "type"`)
		}
		return nc, nil
	}
	raw, ok := nc.top["plugins"]
	if !ok {
		return nil, errors.New(`no "plugins" list`)
	}
	if err := json.Unmarshal(raw, &nc.plugins); err != nil {
		return nil, fmt.Errorf(`"plugins" is not a list: %w`, err)
	}
	if len(nc.plugins) == 0 {
		return nil, errors.New(`empty "plugins" list`)
	}
	return nc, nil
}

// pluginType returns the "type" of a plugin entry, or "" if it has none.
func pluginType(raw json.RawMessage) string {
	var t struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(raw, &t)
	return t.Type
}

// findOurs returns the index of the first entry of type name, or -1, and the value of its
// conversion marker.
func (nc *netConf) findOurs(name string) (idx int, convertedFrom string) {
	for i, p := range nc.plugins {
		if pluginType(p) != name {
			continue
		}
		var m struct {
			From string `json:"sluiceConvertedFrom"`
		}
		_ = json.Unmarshal(p, &m)
		return i, m.From
	}
	return -1, ""
}

// toList turns a single-plugin config into the equivalent conflist, the way the runtime
// itself does (libcni ConfListFromConf): cniVersion and name move up, the rest is the
// first plugin.
func (nc *netConf) toList() {
	if nc.plugins != nil {
		return
	}
	plugin := maps.Clone(nc.top)
	top := map[string]json.RawMessage{}
	for _, k := range []string{"cniVersion", "name"} {
		if v, ok := plugin[k]; ok {
			top[k] = v
			delete(plugin, k)
		}
	}
	b, _ := marshal(plugin) // a map of RawMessage that came from valid JSON: cannot fail
	nc.top, nc.plugins = top, []json.RawMessage{b}
}

// toSingle undoes toList. It needs a list of exactly one plugin.
func (nc *netConf) toSingle() error {
	if len(nc.plugins) != 1 {
		return fmt.Errorf("cannot turn a list of %d plugins back into one plugin", len(nc.plugins))
	}
	var plugin map[string]json.RawMessage
	if err := json.Unmarshal(nc.plugins[0], &plugin); err != nil {
		return fmt.Errorf("plugin entry is not a JSON object: %w", err)
	}
	for _, k := range []string{"cniVersion", "name"} {
		if v, ok := nc.top[k]; ok {
			plugin[k] = v
		}
	}
	nc.top, nc.plugins = plugin, nil
	return nil
}

// chain puts entry (our plugin's config, "type" included) into the list: in place of our
// existing entry if there is one, so a re-install only updates fields, else at the end,
// where a chained plugin must run. Further copies of our entry are dropped.
func (nc *netConf) chain(name string, entry map[string]any) error {
	idx, from := nc.findOurs(name)
	if from != "" {
		if _, set := entry[convertedFromKey]; !set {
			entry = maps.Clone(entry)
			entry[convertedFromKey] = from
		}
	}
	b, err := marshal(entry)
	if err != nil {
		return fmt.Errorf("encode %s config: %w", name, err)
	}
	if idx < 0 {
		nc.plugins = append(nc.plugins, b)
		return nil
	}
	nc.plugins[idx] = b
	nc.plugins = dropOurs(nc.plugins, name, idx+1)
	return nil
}

// unchain removes every entry of ours and returns the conversion marker of the first.
func (nc *netConf) unchain(name string) (removed bool, convertedFrom string) {
	idx, from := nc.findOurs(name)
	if idx < 0 {
		return false, ""
	}
	nc.plugins = dropOurs(nc.plugins, name, idx)
	return true, from
}

// dropOurs removes the entries of type name at index from and after.
func dropOurs(plugins []json.RawMessage, name string, from int) []json.RawMessage {
	out := plugins[:from:from]
	for _, p := range plugins[from:] {
		if pluginType(p) != name {
			out = append(out, p)
		}
	}
	return out
}

// encode renders the config the way it will be written, ending in a newline.
func (nc *netConf) encode() ([]byte, error) {
	top := map[string]any{}
	for k, v := range nc.top {
		top[k] = v
	}
	if nc.plugins != nil {
		top["plugins"] = nc.plugins
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	// Keep "<", ">" and "&" in user values as they were rather than as \u003c escapes.
	enc.SetEscapeHTML(false)
	if err := enc.Encode(top); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// marshal is json.Marshal without HTML escaping, for the same reason as in encode.
func marshal(v any) (json.RawMessage, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}
