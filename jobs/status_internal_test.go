package jobs

import "testing"

// TestWaitKindOfDelayedJobSentBack: a delayed job delivered before its
// run_at goes back to the retry set until then; a Waiter's counts list it
// as due later, as Status does, not as retried after a fault.
func TestWaitKindOfDelayedJobSentBack(t *testing.T) {
	note := WaitSchedule + ":" + errNotDue.Error()
	if got := waitKindOf("retry", note, false); got != WaitSchedule {
		t.Errorf("waitKindOf(retry, %q) = %q, want %q", note, got, WaitSchedule)
	}
	if got := waitKindOf("retry", WaitRetry+":gateway down", false); got != WaitRetry {
		t.Errorf("waitKindOf(retry, a fault) = %q, want %q", got, WaitRetry)
	}
}
