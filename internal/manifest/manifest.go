// Package manifest reads a directory of Kubernetes manifests the way `kubectl apply -R -f`
// does: every *.yaml, *.yml and *.json file below it, multi-document YAML split at its
// "---" lines. The node agent and ztunnel both read the local lab's registry (or any
// such directory) with it, so they agree on what the directory holds; each decodes the
// kinds it needs from the documents' JSON.
package manifest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"
)

// Doc is one object of a manifest file.
type Doc struct {
	// Where names the document for error messages: the file and the document's number
	// in it ("pods/web.yaml#2").
	Where string
	Kind  string
	// JSON is the document converted to JSON, ready for json.Unmarshal.
	JSON []byte
}

// ReadDir returns the documents of every manifest below dir, in path order. A file or
// document that cannot be read or parsed is reported in errs and skipped: it never hides
// the others. A directory that does not exist holds nothing; other errors walking it
// end the read (err).
func ReadDir(dir string) (docs []Doc, errs []error, err error) {
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // the directory, or a file removed while we walked
			}
			return err
		}
		if d.IsDir() || !IsManifest(path) {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
			return nil
		}
		for i, part := range splitDocuments(b) {
			if len(bytes.TrimSpace(part)) == 0 {
				continue
			}
			where := fmt.Sprintf("%s#%d", path, i+1)
			j, err := yaml.YAMLToJSON(part)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", where, err))
				continue
			}
			if string(j) == "null" {
				continue // only comments
			}
			var meta struct {
				Kind string `json:"kind"`
			}
			if err := json.Unmarshal(j, &meta); err != nil {
				errs = append(errs, fmt.Errorf("%s: not an object: %w", where, err))
				continue
			}
			docs = append(docs, Doc{Where: where, Kind: meta.Kind, JSON: j})
		}
		return nil
	})
	return docs, errs, err
}

// IsManifest reports whether path names a file ReadDir reads.
func IsManifest(path string) bool {
	return strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml") || strings.HasSuffix(path, ".json")
}

// Stamp summarizes the manifests below dir (paths, sizes, modification times), so that a
// poller notices a change without parsing anything.
func Stamp(dir string) (string, error) {
	var parts []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !IsManifest(path) {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		parts = append(parts, fmt.Sprintf("%s:%d:%d", path, info.Size(), info.ModTime().UnixNano()))
		return nil
	})
	sort.Strings(parts)
	return strings.Join(parts, "|"), err
}

// splitDocuments splits a multi-document YAML file at its "---" lines.
func splitDocuments(b []byte) [][]byte {
	var (
		out [][]byte
		cur []byte
	)
	for _, line := range bytes.SplitAfter(b, []byte("\n")) {
		if t := bytes.TrimSpace(line); bytes.Equal(t, []byte("---")) {
			out = append(out, cur)
			cur = nil
			continue
		}
		cur = append(cur, line...)
	}
	return append(out, cur)
}
