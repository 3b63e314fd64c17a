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
	if o.file == "-" && isTerminalIn(stdin) {
		fmt.Fprintln(stderr, "enqueue: reading jobs from the terminal, one JSON object a line; end with Ctrl-D")
	}
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
		lineNo   = 0
		lines    = newLineReader(in, maxLineBytes)
		defaults = defaultsFrom(o)
		sum      = newSummary()
		invalid  []jobs.Result
	)
	defer lines.close()
	// stopped ends a batch interrupted before its last line was read (or
	// enqueued): as an interrupted wait does, it names the jobs already
	// enqueued that have no result yet.
	stopped := func() error {
		lines.close()
		cause := fmt.Errorf("%w before the batch was read to its end", errInterrupted)
		if w == nil {
			where := "printed above"
			if o.out != "" {
				where = "in " + o.out
			}
			return fmt.Errorf("%w: %d jobs were enqueued (their ids are %s)", cause, enqueued, where)
		}
		return newCollector(prod, w, stderr, nil, "").interrupted(cause)
	}
	for {
		l, cerr := lines.next(ctx)
		if cerr != nil {
			return stopped()
		}
		line, tooLong, err := l.line, l.tooLong, l.err
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
			defaults.apply(&j)
			e, perr = prod.Enqueue(ctx, j, notify)
			if perr != nil && ctx.Err() != nil {
				return stopped()
			}
		}
		if perr != nil {
			fmt.Fprintf(stderr, "line %d: %v\n", lineNo, perr)
			invalid = append(invalid, invalidResult(line, lineNo, j, perr))
			if errors.Is(err, io.EOF) {
				break
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
		if len(invalid) > 0 {
			fmt.Fprintf(stderr, "; %d invalid lines", len(invalid))
		}
		fmt.Fprintln(stderr)
		if len(invalid) > 0 {
			return &app.ExitError{Code: 1}
		}
		return nil
	}

	prog := newProgress(stderr, enqueued+len(invalid), sum)
	// print writes a result line; on a terminal shared with the progress
	// bar, the bar is cleared first and redrawn after.
	print := func(r jobs.Result) error {
		prog.clear()
		err := writeJSONLine(out, r)
		sum.add(r)
		prog.draw()
		return err
	}
	for _, r := range invalid {
		if err := print(r); err != nil {
			return err
		}
	}
	c := newCollector(prod, w, stderr, prog, "")
	for w.Pending() > 0 {
		res, err := c.next(ctx)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				err = errInterrupted
			}
			return c.interrupted(err)
		}
		if err := print(res); err != nil {
			return err
		}
	}
	prog.finish()
	sum.write(stderr, time.Since(prog.start))
	if n := sum.errors(); n > 0 {
		fmt.Fprintf(stderr, "%d of %d jobs ended in error\n", n, sum.results)
		return &app.ExitError{Code: 1}
	}
	return nil
}

// errInterrupted is the cause of a wait stopped by a signal.
var errInterrupted = errors.New("interrupted")

// invalidResult is the "error" result of a batch line that could not be
// enqueued. Its id is the line's own when it has one, else
// "invalid-line-N": never "", so that results can be told apart, and
// never a job's (no job has that id: it was not enqueued).
func invalidResult(line []byte, lineNo int, j jobs.Job, err error) jobs.Result {
	id := j.ID
	if id == "" {
		var partial struct {
			ID     string `json:"id"`
			TaskID string `json:"task_id"`
		}
		if json.Unmarshal(line, &partial) == nil {
			id, j.TaskID = partial.ID, partial.TaskID
		}
	}
	if id == "" {
		id = fmt.Sprintf("invalid-line-%d", lineNo)
	}
	now := time.Now().UTC()
	return jobs.Result{ID: id, TaskID: j.TaskID, Status: jobs.StatusError, ReturnCode: 1,
		QueuedAt: now, FinishedAt: now, Error: fmt.Sprintf("line %d: %v", lineNo, err)}
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
