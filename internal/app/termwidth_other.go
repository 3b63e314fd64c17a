//go:build !linux

package app

import "io"

// TerminalWidth returns 0 (unknown) where boxq does not ask the terminal.
func TerminalWidth(io.Writer) int { return 0 }
