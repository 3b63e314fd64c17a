package main

import (
	"flag"
	"fmt"
	"strconv"
	"time"

	"github.com/boxq/boxq/internal/app"
	"github.com/boxq/boxq/jobs"
)

// durationFlag is a time.Duration flag whose error says what to write: a
// bare number ("-timeout 5") gets "5s" suggested.
type durationFlag struct{ d *time.Duration }

func (f durationFlag) String() string {
	if f.d == nil {
		return ""
	}
	return f.d.String()
}

func (f durationFlag) Set(s string) error {
	d, err := time.ParseDuration(s)
	if err == nil {
		*f.d = d
		return nil
	}
	if _, nerr := strconv.ParseFloat(s, 64); nerr == nil {
		return fmt.Errorf("a duration needs a unit: %ss (or %sm, %sh)", s, s, s)
	}
	return fmt.Errorf("not a duration: want a number with a unit, as in 30s, 5m or 1h30m")
}

// The flags -cwd, -timeout, -queue, -image and -persistent, given
// explicitly, are the defaults of the job lines of a batch (-f), of a
// schedule's job file (-schedule -f) or of a fan-out (-tasks) that lack
// the field: a field a line gives wins. Flags
// not given leave the lines alone (the job defaults apply). -task, -id and
// -stdin-file name one job: rejectPerJob refuses them with such a mode.

// perJobFlags name one job, and why each makes no sense for many.
var perJobFlags = []struct{ name, why string }{
	{"task", "each line names its task_id"},
	{"id", "each line has its own id (or gets a new one)"},
	{"stdin-file", `each line gives its own stdin (the "stdin" field)`},
}

// rejectPerJob returns a usage error when a flag that names one job was
// given with mode ("-f", "-tasks"), which makes many.
func rejectPerJob(set map[string]bool, mode string) error {
	for _, f := range perJobFlags {
		if set[f.name] {
			return app.Usagef("with %s %s; drop -%s", mode, f.why, f.name)
		}
	}
	return nil
}

// lineDefaults holds the explicit values of lineFlags.
type lineDefaults struct {
	cwd, queue, image *string
	timeoutS          *float64
	persistent        *bool
}

// explicitFlags returns the names of the flags given on the command line.
func explicitFlags(fs *flag.FlagSet) map[string]bool {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	return set
}

// defaultsFrom takes the lineFlags given explicitly from o.
func defaultsFrom(o *options) lineDefaults {
	var d lineDefaults
	if o.set["cwd"] {
		d.cwd = &o.cwd
	}
	if o.set["queue"] {
		d.queue = &o.queue
	}
	if o.set["image"] {
		d.image = &o.image
	}
	if o.set["timeout"] {
		secs := o.timeout.Seconds()
		d.timeoutS = &secs
	}
	if o.set["persistent"] {
		d.persistent = &o.persist
	}
	return d
}

// apply fills the fields j lacks with the explicit flags.
func (d lineDefaults) apply(j *jobs.Job) {
	if d.cwd != nil && j.Cwd == "" {
		j.Cwd = *d.cwd
	}
	if d.queue != nil && j.Queue == "" {
		j.Queue = *d.queue
	}
	if d.image != nil && j.Image == "" {
		j.Image = *d.image
	}
	if d.timeoutS != nil && j.TimeoutS == nil {
		t := *d.timeoutS
		j.TimeoutS = &t
	}
	if d.persistent != nil && j.Persistent == nil {
		p := *d.persistent
		j.Persistent = &p
	}
}
