package main

import (
	"bufio"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// TestAPIBatchDuplicateIDKeepsFirstResult: a batch whose second line
// repeats the first line's id refuses the second line, and still streams
// the first job's result (the refusal must not stop the wait for the job
// the id already names).
func TestAPIBatchDuplicateIDKeepsFirstResult(t *testing.T) {
	st := newAPIStack(t, "")
	st.startWorker(t)
	body := `{"id":"dup-1","task_id":"t-dup","command":"echo one"}` + "\n" +
		`{"id":"dup-1","task_id":"t-dup","command":"echo two"}` + "\n"
	resp, err := http.Post(st.url+"/v1/jobs/batch?wait=60s", "application/x-ndjson", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var (
		results []batchResult
		refused []batchRefused
		sum     *summary
	)
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var d struct {
			batchResult
			Error   string   `json:"error"`
			Summary *summary `json:"summary"`
		}
		if err := json.Unmarshal(sc.Bytes(), &d); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		switch {
		case d.Summary != nil:
			sum = d.Summary
		case d.Error != "":
			refused = append(refused, batchRefused{Line: d.Line, Error: d.Error})
		case d.Result != nil:
			results = append(results, d.batchResult)
		}
	}
	if len(refused) != 1 || refused[0].Line != 2 {
		t.Errorf("refused lines: %+v; want line 2 only", refused)
	}
	if len(results) != 1 || results[0].Line != 1 || results[0].Result.Output != "one\n" {
		t.Errorf("result lines: %+v; want line 1's result (output \"one\\n\")", results)
	}
	if sum == nil || sum.Results != 1 || sum.Pending != 0 {
		t.Errorf("summary: %+v; want 1 result, 0 pending", sum)
	}
}
