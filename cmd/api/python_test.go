package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestPythonClient runs the Python client's pytest suite
// (clients/python/tests) against this API, built here: every client
// method, errors, interrupts, a 1,000-job batch, the environment adapter
// and the offline install. It skips when Debian's python3 with pytest is
// missing, unless BOXQ_REQUIRE_PYTHON=1 (CI) makes that a failure.
func TestPythonClient(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: the Python suite takes about half a minute")
	}
	python := "/usr/bin/python3"
	if err := exec.Command(python, "-c", "import pytest").Run(); err != nil {
		if os.Getenv("BOXQ_REQUIRE_PYTHON") == "1" {
			t.Fatalf("BOXQ_REQUIRE_PYTHON=1 but %s cannot import pytest (%v): apt-get install -y python3-pytest python3-venv", python, err)
		}
		t.Skipf("no pytest for %s (%v); apt-get install -y python3-pytest python3-venv to run the Python client's tests", python, err)
	}
	bin := filepath.Join(t.TempDir(), "api")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		t.Fatalf("go build: %v", err)
	}
	dir, err := filepath.Abs("../../clients/python")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "BOXQ_API_BIN="+bin, "PYTHONDONTWRITEBYTECODE=1")
	out, err := cmd.CombinedOutput()
	t.Logf("pytest:\n%s", out)
	if err != nil {
		t.Fatalf("pytest failed: %v", err)
	}
}
