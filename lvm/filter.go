package lvm

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
)

// FilterError says that lvm.conf's regex filter (devices/filter or
// devices/global_filter) rejects a device by every name it would have:
// LVM would not see a PV there.
type FilterError struct {
	Device  string // the device's main name, /dev/mapper/NAME for a mapping
	Setting string // "devices/filter" or "devices/global_filter"
	Pattern string // the reject pattern that matched, as written
}

func (e *FilterError) Error() string {
	return fmt.Sprintf("lvm.conf's %s rejects %s (pattern %q)", e.Setting, e.Device, e.Pattern)
}

// CheckFilters reports whether LVM's regex filters accept a device known
// by names (its main name first; a mapping that does not exist yet can be
// checked by the names it will have). It applies LVM's rule to each
// filter: a name takes the verdict of the first pattern that matches it;
// the device passes if one name is accepted, or if no pattern matches
// any name. A *FilterError names the filter and the pattern that rejects
// it. When LVM uses a devices file the regex filters are not used (the
// devices file decides, and Refresh updates it): nil. A filter this
// package cannot read (a pattern Go's regexp does not take) is not
// judged: nil, and LVM decides at the end.
func (c *Client) CheckFilters(ctx context.Context, names []string) error {
	if _, inUse, err := c.DevicesFile(ctx); err != nil {
		return err
	} else if inUse {
		return nil
	}
	settings := []string{"devices/global_filter", "devices/filter"}
	vals, err := c.configValues(ctx, settings...)
	if err != nil {
		return err
	}
	for _, s := range settings {
		pats, ok := parseFilterValue(vals[s])
		if !ok {
			continue
		}
		if pat, rejected, ok := filterRejects(pats, names); ok && rejected {
			return &FilterError{Device: names[0], Setting: s, Pattern: pat}
		}
	}
	return nil
}

// parseFilterValue reads a filter as lvmconfig prints it: a list
// ["a|...|","r|...|"] (C escapes, as JSON's for \\ and \") or, already
// unquoted, one pattern.
func parseFilterValue(v string) ([]string, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return nil, true
	}
	if !strings.HasPrefix(v, "[") {
		return []string{v}, true
	}
	var pats []string
	if err := json.Unmarshal([]byte(v), &pats); err != nil {
		return nil, false
	}
	return pats, true
}

type filterPattern struct {
	accept bool
	text   string
	re     *regexp.Regexp
}

// compileFilter parses patterns of the form a<sep>regex<sep> or
// r<sep>regex<sep>; the separator pairs ( ) [ ] { } or is any character
// used twice. ok is false if one cannot be read.
func compileFilter(pats []string) ([]filterPattern, bool) {
	var out []filterPattern
	for _, p := range pats {
		if len(p) < 3 || (p[0] != 'a' && p[0] != 'r') {
			return nil, false
		}
		open := p[1]
		closer := map[byte]byte{'(': ')', '[': ']', '{': '}'}[open]
		if closer == 0 {
			closer = open
		}
		if p[len(p)-1] != closer {
			return nil, false
		}
		re, err := regexp.Compile(p[2 : len(p)-1])
		if err != nil {
			return nil, false
		}
		out = append(out, filterPattern{accept: p[0] == 'a', text: p, re: re})
	}
	return out, true
}

// filterRejects applies LVM's regex filter rule to a device's names: the
// device is rejected if no name's first matching pattern accepts it and
// some name's rejects it (that pattern is returned). ok is false if the
// patterns cannot be read.
func filterRejects(pats, names []string) (pattern string, rejected, ok bool) {
	fps, ok := compileFilter(pats)
	if !ok {
		return "", false, false
	}
	for _, n := range names {
		for _, fp := range fps {
			if !fp.re.MatchString(n) {
				continue
			}
			if fp.accept {
				return "", false, true
			}
			if pattern == "" {
				pattern = fp.text
			}
			break
		}
	}
	return pattern, pattern != "", true
}
