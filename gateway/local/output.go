package local

import (
	"fmt"
	"unicode/utf8"
)

// capBuffer keeps the head and the tail of an exec's output within a limit:
// the first limit/2 bytes and the last limit-limit/2, with a count of what
// fell in between. It grows only as output arrives, so an exec that prints
// little costs little, however high the limit.
//
// It is not safe for concurrent use: one reader goroutine writes it, and
// the exec's supervisor reads it only after that goroutine is done.
type capBuffer struct {
	headMax int
	tailMax int
	head    []byte
	tail    []byte // a ring once full: tail[tailPos:] then tail[:tailPos] is the order
	tailPos int
	total   int64
}

func newCapBuffer(limit int) *capBuffer {
	return &capBuffer{headMax: limit / 2, tailMax: limit - limit/2}
}

// Write keeps p's bytes that belong to the head or, for now, to the tail.
// It never fails.
func (b *capBuffer) Write(p []byte) (int, error) {
	n := len(p)
	b.total += int64(n)
	if room := b.headMax - len(b.head); room > 0 {
		k := min(room, len(p))
		b.head = append(b.head, p[:k]...)
		p = p[k:]
	}
	if len(p) == 0 || b.tailMax == 0 {
		return n, nil
	}
	if len(p) >= b.tailMax {
		// p alone fills the tail: keep its end, in order.
		b.tail = append(b.tail[:0], p[len(p)-b.tailMax:]...)
		b.tailPos = 0
		return n, nil
	}
	if room := b.tailMax - len(b.tail); room > 0 {
		k := min(room, len(p))
		b.tail = append(b.tail, p[:k]...)
		p = p[k:]
	}
	// The tail is full: overwrite its oldest bytes.
	for len(p) > 0 {
		k := copy(b.tail[b.tailPos:], p)
		p = p[k:]
		b.tailPos = (b.tailPos + k) % b.tailMax
	}
	return n, nil
}

// Result returns the kept output, and how many bytes were cut from it.
// When bytes were cut, a line "[... N bytes omitted ...]" stands where they
// were. The cut points are moved to UTF-8 boundaries, so that text output
// stays valid text; the bytes this drops are counted as omitted.
func (b *capBuffer) Result() (output string, omitted int64) {
	tail := b.tail
	if b.tailPos != 0 {
		tail = append(append(make([]byte, 0, len(b.tail)), b.tail[b.tailPos:]...), b.tail[:b.tailPos]...)
	}
	kept := int64(len(b.head) + len(tail))
	if kept == b.total {
		return string(b.head) + string(tail), 0
	}
	head := trimIncompleteEnd(b.head)
	tail = trimIncompleteStart(tail)
	omitted = b.total - int64(len(head)) - int64(len(tail))
	return fmt.Sprintf("%s\n[... %d bytes omitted ...]\n%s", head, omitted, tail), omitted
}

// trimIncompleteEnd drops a UTF-8 sequence cut short at the end of p.
func trimIncompleteEnd(p []byte) []byte {
	for i := 1; i <= utf8.UTFMax && i <= len(p); i++ {
		c := p[len(p)-i]
		if c < utf8.RuneSelf {
			return p // ASCII: nothing is cut
		}
		if utf8.RuneStart(c) {
			if !utf8.FullRune(p[len(p)-i:]) {
				return p[:len(p)-i]
			}
			return p
		}
	}
	return p
}

// trimIncompleteStart drops the continuation bytes of a UTF-8 sequence
// whose start was cut off the front of p.
func trimIncompleteStart(p []byte) []byte {
	for i := 0; i < utf8.UTFMax && i < len(p); i++ {
		if utf8.RuneStart(p[i]) {
			return p[i:]
		}
	}
	return p
}
