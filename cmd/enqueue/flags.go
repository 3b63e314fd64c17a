package main

import (
	"flag"
	"fmt"
	"strconv"
	"time"

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

// lineFlags are the flags that, given explicitly, are the defaults of the
// job lines of a batch (-f) or a fan-out (-tasks) that lack the field: a
// field a line gives wins. Flags not given leave the lines alone (the job
// defaults apply). -id and -stdin-file make no sense for many jobs and are
// rejected with -f, like -task.
var lineFlags = []string{"cwd", "timeout", "queue", "image", "persistent"}

// perJobFlags are rejected with -f: each names one job.
var perJobFlags = []string{"task", "id", "stdin-file"}

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
