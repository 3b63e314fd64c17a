package main

import (
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
)

// readmeSchedulePUT is a curl PUT of a schedule as the README shows it: its
// name (the path) and its -d body.
var readmeSchedulePUT = regexp.MustCompile(`curl -s -XPUT \S*/v1/schedules/(\S+) [^\n]*\\\n\s*-d '([^']*)'`)

// TestREADMEScheduleBodies: every schedule the README's curl examples PUT
// is taken by the API as shown (200, the schedule named by the path). The
// e2e README test skips those blocks (they need a running API); without
// this one a body the API refuses would stay in the README unnoticed.
func TestREADMEScheduleBodies(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	puts := readmeSchedulePUT.FindAllStringSubmatch(string(readme), -1)
	if n := strings.Count(string(readme), "-XPUT localhost:8080/v1/schedules/"); len(puts) != n || n == 0 {
		t.Fatalf("read %d schedule PUTs of the README's %d: the pattern no longer matches how they are written", len(puts), n)
	}
	st := newAPIStack(t, "")
	for _, p := range puts {
		var got struct{ Name, Error string }
		if code := do(t, http.DefaultClient, "PUT", st.url+"/v1/schedules/"+p[1], "", p[2], &got); code != http.StatusOK || got.Name != p[1] {
			t.Errorf("README's PUT /v1/schedules/%s %s: %d %+v; want 200 and the schedule", p[1], p[2], code, got)
		}
	}
}
