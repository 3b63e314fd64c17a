package limits

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"
)

// ShimArg, as the first argument of the gateway binary, runs it as the
// cgroup v1 shim: `gateway -boxq-cgroup-shim PROCS_FILE… -- PATH ARGV…`.
const ShimArg = "-boxq-cgroup-shim"

// RunShim is the first thing main does. Given the shim's arguments it joins
// the cgroups and execs the command, never returning; given anything else it
// returns false at once. It writes its own pid, so the exec'd command (and
// all it forks) starts inside the sandbox's cgroups.
func RunShim(args []string) bool {
	if len(args) < 2 || args[1] != ShimArg {
		return false
	}
	err := shim(args[2:])
	// The exec failed: say so the way a shell would, with its status.
	fmt.Fprintf(os.Stderr, "boxq cgroup shim: %v\n", err)
	os.Exit(126)
	return true
}

func shim(args []string) error {
	i := 0
	for i < len(args) && args[i] != "--" {
		i++
	}
	if i >= len(args)-2 {
		return fmt.Errorf("usage: %s PROCS_FILE… -- PATH ARGV…", ShimArg)
	}
	pid := strconv.Itoa(os.Getpid())
	for _, procs := range args[:i] {
		// Failing to join is fatal: running outside the limits would
		// pretend they hold.
		if err := writeFile(procs, pid); err != nil {
			return fmt.Errorf("join cgroup: %w", err)
		}
	}
	path := args[i+1]
	if lp, err := exec.LookPath(path); err == nil {
		path = lp
	}
	return syscall.Exec(path, args[i+2:], os.Environ())
}
