package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/jobs"
)

// maxLineBytes bounds one line of a batch: far above any valid job (stdin
// is capped at 4 MiB, JSON escaping can grow it 6x), low enough that a
// runaway line cannot exhaust memory.
const maxLineBytes = 32 << 20

// runBatch enqueues every valid line of the batch; invalid lines are
// reported with their line number and do not stop the others. With -wait it
// prints one result line per job as each finishes.
func runBatch(ctx context.Context, o *options, prod *jobs.Producer, stdin io.Reader, stdout, stderr io.Writer) error {
	in := stdin
	if o.file != "-" {
		f, err := os.Open(o.file)
		if err != nil {
			return app.Usagef("-f: %v", err)
		}
		defer f.Close()
		in = f
	}
	out := stdout
	if o.out != "" {
		f, err := os.Create(o.out)
		if err != nil {
			return app.Usagef("-o: %v", err)
		}
		defer f.Close()
		bw := bufio.NewWriter(f)
		defer bw.Flush()
		out = bw
	}

	var w *jobs.Waiter
	notify := ""
	if o.wait {
		var err error
		if w, err = prod.Subscribe(ctx); err != nil {
			return err
		}
		defer w.Close()
		notify = w.Channel()
	}

	var (
		seen     = map[string]int{} // job id → line, for duplicates within the batch
		enqueued = 0
		failed   = 0
		lineNo   = 0
		rd       = bufio.NewReaderSize(in, 64<<10)
	)
	for {
		line, tooLong, err := readLine(rd, maxLineBytes)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("-f: read line %d: %w", lineNo+1, err)
		}
		if len(line) == 0 && !tooLong && errors.Is(err, io.EOF) {
			break
		}
		lineNo++
		if strings.TrimSpace(string(line)) == "" && !tooLong {
			if errors.Is(err, io.EOF) {
				break
			}
			continue
		}
		var j jobs.Job
		var perr error
		if tooLong {
			perr = fmt.Errorf("invalid job: line is longer than %d bytes", maxLineBytes)
		} else {
			j, perr = jobs.ParseJob(line)
		}
		if perr == nil && j.ID != "" {
			if first, dup := seen[j.ID]; dup {
				fmt.Fprintf(stderr, "line %d: job id %q repeats line %d: it is one job, enqueued once\n", lineNo, j.ID, first)
				continue
			}
		}
		var e jobs.Enqueued
		if perr == nil {
			e, perr = prod.Enqueue(ctx, j, notify)
			if perr != nil && ctx.Err() != nil {
				return perr
			}
		}
		if perr != nil {
			failed++
			fmt.Fprintf(stderr, "line %d: %v\n", lineNo, perr)
			if o.wait {
				bad := jobs.Result{ID: j.ID, TaskID: j.TaskID, Status: jobs.StatusError, ReturnCode: 1,
					Error: fmt.Sprintf("line %d: %v", lineNo, perr)}
				if err := writeJSONLine(out, bad); err != nil {
					return err
				}
			}
			continue
		}
		seen[e.ID] = lineNo
		enqueued++
		if e.Existed {
			fmt.Fprintf(stderr, "line %d: job %s was already enqueued; waiting for its result\n", lineNo, e.ID)
		}
		if w != nil {
			w.Add(e)
		} else {
			fmt.Fprintln(out, e.ID)
		}
		if errors.Is(err, io.EOF) {
			break
		}
	}
	if !o.wait {
		fmt.Fprintf(stderr, "enqueued %d jobs", enqueued)
		if failed > 0 {
			fmt.Fprintf(stderr, "; %d invalid lines", failed)
		}
		fmt.Fprintln(stderr)
		if failed > 0 {
			return &app.ExitError{Code: 1}
		}
		return nil
	}

	prog := newProgress(stderr, enqueued)
	errorsSeen := failed
	for w.Pending() > 0 {
		res, err := nextOrTick(ctx, w, prog)
		if err != nil {
			prog.finish()
			return fmt.Errorf("waiting for %d results: %w (the jobs go on; read results later with -result ID)", w.Pending(), err)
		}
		if res.Status == jobs.StatusError {
			errorsSeen++
		}
		if err := writeJSONLine(out, res); err != nil {
			return err
		}
		prog.add(res.Status == jobs.StatusError)
	}
	prog.finish()
	if errorsSeen > 0 {
		fmt.Fprintf(stderr, "%d of %d jobs ended in error\n", errorsSeen, enqueued+failed)
		return &app.ExitError{Code: 1}
	}
	return nil
}

// nextOrTick waits for the next result, redrawing the progress every
// second meanwhile, so a long wait is never silent.
func nextOrTick(ctx context.Context, w *jobs.Waiter, prog *progress) (jobs.Result, error) {
	for {
		tctx, cancel := context.WithTimeout(ctx, time.Second)
		res, err := w.Next(tctx)
		cancel()
		if err == nil || ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
			return res, err
		}
		prog.draw()
	}
}

// readLine reads one line without its newline. A line longer than limit is
// consumed to its end and reported as tooLong, without keeping it.
func readLine(rd *bufio.Reader, limit int) (line []byte, tooLong bool, err error) {
	for {
		chunk, err := rd.ReadSlice('\n')
		if !tooLong {
			if len(line)+len(chunk) > limit+1 {
				tooLong, line = true, nil
			} else {
				line = append(line, chunk...)
			}
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		line = trimNewline(line)
		return line, tooLong, err
	}
}

func trimNewline(b []byte) []byte {
	if n := len(b); n > 0 && b[n-1] == '\n' {
		b = b[:n-1]
		if n := len(b); n > 0 && b[n-1] == '\r' {
			b = b[:n-1]
		}
	}
	return b
}

func writeJSONLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	_, err = w.Write(b)
	return err
}

// progress draws a bar on stderr when it is a terminal; otherwise it says
// every 10 s how far the batch is, so a long wait is never silent.
type progress struct {
	w        io.Writer
	tty      bool
	total    int
	done     int
	errs     int
	start    time.Time
	lastLine time.Time
}

func newProgress(w io.Writer, total int) *progress {
	p := &progress{w: w, tty: app.IsTerminal(w), total: total, start: time.Now()}
	p.lastLine = p.start
	p.draw()
	return p
}

func (p *progress) add(isErr bool) {
	p.done++
	if isErr {
		p.errs++
	}
	p.draw()
}

func (p *progress) draw() {
	elapsed := time.Since(p.start).Round(100 * time.Millisecond)
	if !p.tty {
		if time.Since(p.lastLine) >= 10*time.Second {
			p.lastLine = time.Now()
			fmt.Fprintf(p.w, "progress: %d/%d results, %d errors, %s\n", p.done, p.total, p.errs, elapsed)
		}
		return
	}
	const width = 30
	filled := width
	if p.total > 0 {
		filled = p.done * width / p.total
	}
	fmt.Fprintf(p.w, "\r[%s%s] %d/%d  errors %d  %s ", strings.Repeat("#", filled), strings.Repeat(".", width-filled),
		p.done, p.total, p.errs, elapsed)
}

func (p *progress) finish() {
	if p.tty {
		fmt.Fprintln(p.w)
	}
}
