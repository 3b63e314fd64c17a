package main

import (
	"fmt"
	"io"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/jobs"
)

// progress shows how a batch goes on stderr. On a terminal it is one line
// redrawn in place; anything else printed while it shows (a result line on
// the same terminal, a warning) goes through clear and then redraw, so
// that nothing is glued to the bar. Elsewhere it prints a line every 10 s,
// so that a long wait is never silent.
type progress struct {
	w        io.Writer
	tty      bool
	total    int
	sum      *summary
	waits    jobs.WaitCounts
	start    time.Time
	lastLine time.Time
	now      func() time.Time
	shown    bool // the bar is on screen
}

func newProgress(w io.Writer, total int, sum *summary) *progress {
	p := &progress{w: w, tty: app.IsTerminal(w), total: total, sum: sum, now: time.Now}
	p.start = p.now()
	p.lastLine = p.start
	p.draw()
	return p
}

// setWaits records what the outstanding jobs wait for.
func (p *progress) setWaits(c jobs.WaitCounts) { p.waits = c }

// waitLine says what the outstanding jobs wait for, e.g. "4 running,
// 6 wait for capacity, 2 for their task's turn".
func waitLine(c jobs.WaitCounts) string {
	var parts []string
	add := func(n int, what string) {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, what))
		}
	}
	add(c.Running, "running")
	add(c.Capacity, "wait for capacity")
	add(c.Turn, "wait for their task's turn")
	add(c.Worker, "wait for a worker")
	add(c.Retry, "wait to retry after a fault")
	add(c.Schedule, "wait for their time")
	return strings.Join(parts, ", ")
}

// shortWaitLine is waitLine for the bar, which must fit a terminal's line:
// "4 run, wait: 6 capacity, 2 turn, 1 worker".
func shortWaitLine(c jobs.WaitCounts) string {
	var parts []string
	for _, n := range []struct {
		n    int
		what string
	}{{c.Capacity, "capacity"}, {c.Turn, "turn"}, {c.Worker, "worker"}, {c.Retry, "retry"}, {c.Schedule, "time"}} {
		if n.n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n.n, n.what))
		}
	}
	out := ""
	if c.Running > 0 {
		out = fmt.Sprintf("%d run", c.Running)
	}
	if len(parts) > 0 {
		out = strings.TrimPrefix(out+", wait: "+strings.Join(parts, ", "), ", ")
	}
	return out
}

func (p *progress) line() string {
	elapsed := p.now().Sub(p.start).Round(100 * time.Millisecond)
	var b strings.Builder
	if p.tty {
		const width = 10
		filled := width
		if p.total > 0 {
			filled = min(p.sum.results*width/p.total, width)
		}
		fmt.Fprintf(&b, "[%s%s] ", strings.Repeat("#", filled), strings.Repeat(".", width-filled))
	} else {
		b.WriteString("progress: ")
	}
	fmt.Fprintf(&b, "%d/%d %s", p.sum.results, p.total, p.sum.statusLine())
	w := waitLine(p.waits)
	if p.tty {
		w = shortWaitLine(p.waits)
	}
	if w != "" {
		fmt.Fprintf(&b, " | %s", w)
	}
	fmt.Fprintf(&b, " | %s", elapsed)
	return b.String()
}

// draw redraws the bar (a terminal), or prints a line when 10 s have
// passed since the last one (elsewhere).
func (p *progress) draw() {
	if !p.tty {
		if p.now().Sub(p.lastLine) >= 10*time.Second {
			p.lastLine = p.now()
			fmt.Fprintln(p.w, p.line())
		}
		return
	}
	// \r to the line's start, the line, then erase what a longer line
	// drawn before left to its right. A line wider than the terminal
	// would wrap, and \r would then go back to its last row only: it is
	// cut to fit.
	line := p.line()
	if width := app.TerminalWidth(p.w); width > 1 && utf8.RuneCountInString(line) > width-1 {
		line = string([]rune(line)[:width-2]) + "…"
	}
	fmt.Fprintf(p.w, "\r%s\x1b[K", line)
	p.shown = true
}

// clear takes the bar off the screen, so that the next output starts on a
// clean line; draw puts it back.
func (p *progress) clear() {
	if p.tty && p.shown {
		fmt.Fprint(p.w, "\r\x1b[K")
		p.shown = false
	}
}

// finish takes the bar away for good.
func (p *progress) finish() { p.clear() }
