package luks

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
)

// object is a JSON object that keeps its members' order and their raw,
// uninterpreted values. LUKS2 metadata is held in this form so that every
// field and token we do not know survives a rewrite unchanged (members
// are re-emitted compacted, in their original order).
type object struct {
	keys []string
	vals map[string]json.RawMessage
}

func newObject() *object { return &object{vals: map[string]json.RawMessage{}} }

// parseObject parses one JSON object. Duplicate keys keep their first
// position and the last value, as json-c (cryptsetup's parser) does.
func parseObject(data []byte) (*object, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("expected a JSON object")
	}
	o := newObject()
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("expected an object key")
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, err
		}
		o.set(key, raw)
	}
	if _, err := dec.Token(); err != nil { // closing '}'
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("trailing data after JSON object")
	}
	return o, nil
}

func (o *object) get(key string) (json.RawMessage, bool) {
	v, ok := o.vals[key]
	return v, ok
}

func (o *object) set(key string, val json.RawMessage) {
	if _, ok := o.vals[key]; !ok {
		o.keys = append(o.keys, key)
	}
	o.vals[key] = val
}

func (o *object) del(key string) {
	if _, ok := o.vals[key]; !ok {
		return
	}
	delete(o.vals, key)
	for i, k := range o.keys {
		if k == key {
			o.keys = append(o.keys[:i], o.keys[i+1:]...)
			break
		}
	}
}

func (o *object) len() int { return len(o.keys) }

// getObject parses member key as an object (nil, nil if absent).
func (o *object) getObject(key string) (*object, error) {
	raw, ok := o.get(key)
	if !ok {
		return nil, nil
	}
	sub, err := parseObject(raw)
	if err != nil {
		return nil, fmt.Errorf("%q: %w", key, err)
	}
	return sub, nil
}

func (o *object) setObject(key string, sub *object) { o.set(key, sub.marshal()) }

// setValue marshals v (which must not contain HTML-escapable text that
// matters; we disable HTML escaping anyway) and stores it.
func (o *object) setValue(key string, v any) error {
	b, err := marshalNoEscape(v)
	if err != nil {
		return err
	}
	o.set(key, b)
	return nil
}

// marshal emits the object compactly: no insignificant white space, no
// HTML escaping, '/' not escaped (cryptsetup writes JSON the same way).
func (o *object) marshal() []byte {
	var buf bytes.Buffer
	buf.WriteByte('{')
	for i, k := range o.keys {
		if i > 0 {
			buf.WriteByte(',')
		}
		kb, _ := marshalNoEscape(k)
		buf.Write(kb)
		buf.WriteByte(':')
		if err := json.Compact(&buf, o.vals[k]); err != nil {
			// Values only come from parseObject or marshalNoEscape, both valid.
			buf.Write(o.vals[k])
		}
	}
	buf.WriteByte('}')
	return buf.Bytes()
}

func marshalNoEscape(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// numericKeys returns the members whose key is a decimal number (LUKS2
// keyslots, tokens, segments, digests), in ascending numeric order.
func (o *object) numericKeys() ([]int, error) {
	ids := make([]int, 0, len(o.keys))
	for _, k := range o.keys {
		n, err := parseID(k)
		if err != nil {
			return nil, err
		}
		ids = append(ids, n)
	}
	sortInts(ids)
	return ids, nil
}

func parseID(k string) (int, error) {
	if k == "" || len(k) > 9 {
		return 0, fmt.Errorf("object key %q is not a small number", k)
	}
	for _, c := range k {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("object key %q is not a number", k)
		}
	}
	return strconv.Atoi(k)
}

func sortInts(a []int) {
	for i := 1; i < len(a); i++ {
		for j := i; j > 0 && a[j] < a[j-1]; j-- {
			a[j], a[j-1] = a[j-1], a[j]
		}
	}
}

// jsonString decodes a raw JSON string.
func jsonString(raw json.RawMessage) (string, bool) {
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

// stringArray decodes a raw JSON array of strings.
func stringArray(raw json.RawMessage) ([]string, bool) {
	var a []string
	if json.Unmarshal(raw, &a) != nil {
		return nil, false
	}
	return a, true
}

// u64String decodes a LUKS2 uint64-as-decimal-string.
func u64String(raw json.RawMessage) (uint64, bool) {
	s, ok := jsonString(raw)
	if !ok || s == "" {
		return 0, false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return n, err == nil
}

// jsonUint32 decodes a JSON integer in uint32 range.
func jsonUint32(raw json.RawMessage) (uint32, bool) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] < '0' || raw[0] > '9' {
		return 0, false // not a JSON integer (cryptsetup requires json_type_int)
	}
	var n json.Number
	if json.Unmarshal(raw, &n) != nil {
		return 0, false
	}
	v, err := strconv.ParseUint(n.String(), 10, 32)
	return uint32(v), err == nil
}
