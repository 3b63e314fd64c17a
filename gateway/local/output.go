package local

import (
	"fmt"
	"os"
	"unicode/utf8"
)

// capBuffer keeps the head and the tail of an exec's output within a limit:
// the first limit/2 bytes and the last limit-limit/2, with a count of what
// fell in between. It grows only as output arrives, so an exec that prints
// little costs little, however high the limit; and past spillAfter bytes
// kept it keeps them in an unlinked file, so that a thousand running execs
// with a full buffer each cost the gateway a file each, not a MiB of heap
// each (twice that in RSS, with the garbage collector's headroom).
//
// It is not safe for concurrent use: one reader goroutine writes it, and
// the exec's supervisor reads it only after that goroutine is done.
type capBuffer struct {
	headMax int
	tailMax int
	// The head is at [0, headLen) of st, the tail at [headMax,
	// headMax+tailLen): a ring once full, whose oldest byte is at tailPos.
	headLen int
	tailLen int
	tailPos int
	total   int64
	st      byteStore
}

// spillAfter is how many bytes of output an exec keeps in memory before
// it moves them to a file.
const spillAfter = 64 << 10

// newCapBuffer returns a buffer for limit bytes that spills to an unlinked
// file in dir beyond spillAfter bytes; dir "" keeps everything in memory.
func newCapBuffer(limit int, dir string) *capBuffer {
	return &capBuffer{headMax: limit / 2, tailMax: limit - limit/2, st: byteStore{memMax: spillAfter, dir: dir}}
}

// Write keeps p's bytes that belong to the head or, for now, to the tail.
// It never fails: a failure to spill is reported by Result.
func (b *capBuffer) Write(p []byte) (int, error) {
	n := len(p)
	b.total += int64(n)
	if room := b.headMax - b.headLen; room > 0 {
		k := min(room, len(p))
		b.st.writeAt(p[:k], b.headLen)
		b.headLen += k
		p = p[k:]
	}
	if len(p) == 0 || b.tailMax == 0 {
		return n, nil
	}
	if len(p) >= b.tailMax {
		// p alone fills the tail: keep its end, in order.
		b.st.writeAt(p[len(p)-b.tailMax:], b.headMax)
		b.tailLen, b.tailPos = b.tailMax, 0
		return n, nil
	}
	if room := b.tailMax - b.tailLen; room > 0 {
		k := min(room, len(p))
		b.st.writeAt(p[:k], b.headMax+b.tailLen)
		b.tailLen += k
		p = p[k:]
	}
	// The tail is full: overwrite its oldest bytes.
	for len(p) > 0 {
		k := min(len(p), b.tailMax-b.tailPos)
		b.st.writeAt(p[:k], b.headMax+b.tailPos)
		p = p[k:]
		b.tailPos = (b.tailPos + k) % b.tailMax
	}
	return n, nil
}

// Result returns the kept output, and how many bytes were cut from it,
// and releases the buffer's file. When bytes were cut, a line
// "[... N bytes omitted ...]" stands where they were. The cut points are
// moved to UTF-8 boundaries, so that text output stays valid text; the
// bytes this drops are counted as omitted.
func (b *capBuffer) Result() (output string, omitted int64) {
	defer b.st.close()
	head := b.st.read(0, b.headLen)
	tail := b.st.read(b.headMax, b.tailLen)
	if b.tailPos != 0 {
		tail = append(append(make([]byte, 0, len(tail)), tail[b.tailPos:]...), tail[:b.tailPos]...)
	}
	note := ""
	if b.st.err != nil {
		note = fmt.Sprintf("\n[gateway: output damaged: %v]\n", b.st.err)
	}
	kept := int64(len(head) + len(tail))
	if kept == b.total {
		return string(head) + string(tail) + note, 0
	}
	head = trimIncompleteEnd(head)
	tail = trimIncompleteStart(tail)
	omitted = b.total - int64(len(head)) - int64(len(tail))
	return fmt.Sprintf("%s\n[... %d bytes omitted ...]\n%s%s", head, omitted, tail, note), omitted
}

// byteStore is the bytes of a capBuffer by offset: in memory up to memMax,
// then in an unlinked file in dir (dir "": in memory always; and when the
// file cannot be made).
type byteStore struct {
	mem    []byte
	memMax int
	dir    string
	f      *os.File
	noFile bool  // a file could not be made: memory it is
	err    error // the first failure to write or read the file: bytes lost
}

func (s *byteStore) writeAt(p []byte, off int) {
	end := off + len(p)
	if s.f == nil && end > s.memMax && s.dir != "" && !s.noFile {
		s.spill()
	}
	if s.f == nil {
		if end > len(s.mem) {
			if end > cap(s.mem) {
				s.mem = append(s.mem[:cap(s.mem)], make([]byte, max(end, 2*cap(s.mem))-cap(s.mem))...)
			}
			s.mem = s.mem[:end]
		}
		copy(s.mem[off:], p)
		return
	}
	if _, err := s.f.WriteAt(p, int64(off)); err != nil && s.err == nil {
		s.err = err
	}
}

// spill moves the bytes to a new unlinked file; on failure they stay in
// memory, as if there were no dir.
func (s *byteStore) spill() {
	f, err := os.CreateTemp(s.dir, "output-")
	if err != nil {
		s.noFile = true
		return
	}
	_ = os.Remove(f.Name())
	if _, err := f.WriteAt(s.mem, 0); err != nil {
		f.Close()
		s.noFile = true
		return
	}
	s.f, s.mem = f, nil
}

// read returns n bytes at off.
func (s *byteStore) read(off, n int) []byte {
	if n == 0 {
		return nil
	}
	if s.f == nil {
		return s.mem[off : off+n]
	}
	buf := make([]byte, n)
	if _, err := s.f.ReadAt(buf, int64(off)); err != nil && s.err == nil {
		s.err = err
	}
	return buf
}

func (s *byteStore) close() {
	if s.f != nil {
		s.f.Close()
		s.f = nil
	}
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
