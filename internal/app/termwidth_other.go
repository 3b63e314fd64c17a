//go:build !linux

package app

import (
	"io"
	"os"
)

// TerminalWidth returns 0 (unknown) where boxq does not ask the terminal.
func TerminalWidth(io.Writer) int { return 0 }

// isTTY takes any character device for a terminal where boxq does not ask
// the terminal.
func isTTY(*os.File) bool { return true }
