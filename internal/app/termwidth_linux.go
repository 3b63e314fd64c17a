package app

import (
	"io"
	"os"
	"syscall"
	"unsafe"
)

// TerminalWidth returns the width in columns of the terminal w writes to,
// 0 when w is not a terminal or the width is unknown.
func TerminalWidth(w io.Writer) int {
	f, ok := w.(*os.File)
	if !ok {
		return 0
	}
	var ws struct{ Row, Col, X, Y uint16 }
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), syscall.TIOCGWINSZ, uintptr(unsafe.Pointer(&ws))); errno != 0 {
		return 0
	}
	return int(ws.Col)
}

// isTTY reports whether the character device f is a terminal: it answers
// a terminal's ioctl, which /dev/null does not.
func isTTY(f *os.File) bool {
	var t syscall.Termios
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), syscall.TCGETS, uintptr(unsafe.Pointer(&t)))
	return errno == 0
}
