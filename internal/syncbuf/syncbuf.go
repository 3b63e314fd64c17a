// Package syncbuf has a bytes.Buffer that one side can write while another
// reads it: the output of a process or a server, read by a test.
package syncbuf

import (
	"bytes"
	"strings"
	"sync"
)

// Buffer is safe for concurrent use. The zero value is ready.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns what was written so far.
func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Lines returns the complete lines written so far.
func (s *Buffer) Lines() []string {
	out := s.String()
	i := strings.LastIndexByte(out, '\n')
	if i < 0 {
		return nil
	}
	return strings.Split(out[:i], "\n")
}
