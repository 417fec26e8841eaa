// Package manifest reads a directory of Kubernetes manifests the way `kubectl apply -R -f`
// does: every *.yaml, *.yml and *.json file below it, multi-document YAML split at lines
// that start with "---" (a comment may follow), and the items of a List (what `kubectl
// get -o yaml` writes) as objects of their own. The node agent and ztunnel both read the
// local lab's registry (or any such directory) with it, so they agree on what the
// directory holds; each decodes the kinds it needs from the documents' JSON.
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
	// Path is the file the object came from.
	Path string
	// Where names the document for error messages: the file and the document's number
	// in it ("pods/web.yaml#2").
	Where string
	Kind  string
	// JSON is the document converted to JSON, ready for json.Unmarshal.
	JSON []byte
}

// FileError is a problem with one file: it could not be read, split or parsed (or it
// vanished while the directory was read). The file's other documents are not returned
// either when splitting fails; otherwise only the failing document is missing.
type FileError struct {
	Path string
	Err  error
}

func (e *FileError) Error() string { return e.Err.Error() }
func (e *FileError) Unwrap() error { return e.Err }

// ReadDir returns the documents of every manifest below dir, in path order. A file or
// document that cannot be read or parsed is reported in errs and skipped: it never hides
// the others. A file removed while the directory is read is reported too, as an error
// matching fs.ErrNotExist, and so is a missing dir (err); a caller that must not act on
// a partial view (ztunnel, whose policies live there) refuses the read on any error.
func ReadDir(dir string) (docs []Doc, errs []error, err error) {
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if path != dir && errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, &FileError{path, err}) // removed while we walked
				return nil
			}
			return err
		}
		if d.IsDir() || !IsManifest(path) {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, &FileError{path, err})
			return nil
		}
		parts, err := splitDocuments(b)
		if err != nil {
			errs = append(errs, &FileError{path, fmt.Errorf("%s: %w", path, err)})
			return nil
		}
		for i, part := range parts {
			fileDocs, docErrs := parseDocument(path, fmt.Sprintf("%s#%d", path, i+1), part)
			docs = append(docs, fileDocs...)
			for _, err := range docErrs {
				errs = append(errs, &FileError{path, err})
			}
		}
		return nil
	})
	return docs, errs, err
}

// parseDocument converts one YAML document to JSON: nothing for an empty one, the items
// of a List (and of Lists in it).
func parseDocument(path, where string, part []byte) ([]Doc, []error) {
	if len(bytes.TrimSpace(part)) == 0 {
		return nil, nil
	}
	j, err := yaml.YAMLToJSON(part)
	if err != nil {
		return nil, []error{fmt.Errorf("%s: %w", where, err)}
	}
	if string(j) == "null" {
		return nil, nil // only comments
	}
	return expand(path, where, j)
}

// expand returns the object j, or, for a List (a kind ending in "List" with an items
// array, as kubectl decides), its items, recursively. A bad item is an error of its own
// and does not hide the others.
func expand(path, where string, j []byte) ([]Doc, []error) {
	var head struct {
		Kind  string          `json:"kind"`
		Items json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(j, &head); err != nil || bytes.Equal(j, []byte("null")) {
		return nil, []error{fmt.Errorf("%s: not an object (%v)", where, err)}
	}
	var items []json.RawMessage
	if !strings.HasSuffix(head.Kind, "List") || json.Unmarshal(head.Items, &items) != nil {
		return []Doc{{Path: path, Where: where, Kind: head.Kind, JSON: j}}, nil
	}
	var (
		docs []Doc
		errs []error
	)
	for i, item := range items {
		d, e := expand(path, fmt.Sprintf("%s items[%d]", where, i), item)
		docs, errs = append(docs, d...), append(errs, e...)
	}
	return docs, errs
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

// splitDocuments splits a multi-document YAML file where kubectl does: at lines that
// start with "---", which only a comment may follow. A "---" further in is content (a
// block scalar's text, say), and anything but a comment after a separator is an error,
// as it is for kubectl.
func splitDocuments(b []byte) ([][]byte, error) {
	var (
		out [][]byte
		cur []byte
	)
	for n, line := range bytes.SplitAfter(b, []byte("\n")) {
		if rest, ok := bytes.CutPrefix(line, []byte("---")); ok {
			rest = bytes.TrimSpace(rest)
			if len(rest) > 0 && rest[0] != '#' {
				return nil, fmt.Errorf("line %d: %q after the document separator; put it on a line of its own", n+1, rest)
			}
			out = append(out, cur)
			cur = nil
			continue
		}
		cur = append(cur, line...)
	}
	return append(out, cur), nil
}
