package app

import (
	"os"
	"testing"
)

// TestDevNullIsNoTerminal: /dev/null is a character device, but no
// terminal: `enqueue -f - </dev/null` must not say it reads jobs from the
// terminal, nor draw a bar into it.
func TestDevNullIsNoTerminal(t *testing.T) {
	f, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no %s: %v", os.DevNull, err)
	}
	defer f.Close()
	if IsTerminal(f) {
		t.Errorf("IsTerminal(%s) = true", os.DevNull)
	}
}
