package gateway

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// startRetryWindow bounds how long Run keeps retrying a start that failed
// for a transient reason. Retrying is safe because a start is keyed by its
// execId: the gateway never runs one execId twice.
const startRetryWindow = 30 * time.Second

// Run starts req in the sandbox and waits for the exec to end.
//
// The first poll is sent at once, with waitMs so that a long-polling gateway
// answers when the exec ends; a gateway that ignores waitMs is polled at an
// interval that grows from PollMin to PollMax. Poll transport errors, 5xx and
// 429 are retried until the deadline (the exec's timeout plus Grace); past
// the deadline Run cancels the exec (never the sandbox) and returns status
// "timeout", rc 124.
//
// When ctx is cancelled Run cancels the exec with a detached, bounded context
// and returns status "cancelled", rc 130 — unless ctx's cause is ErrDetached,
// in which case the exec is left running and Run returns ErrDetached.
//
// Errors: ErrSandboxGone for a 404 on start, ErrExecNotFound for a 404 on
// poll, an *APIError for a permanent or capacity answer.
func (c *Client) Run(ctx context.Context, sandboxID string, req StartRequest) (ExecState, error) {
	timeout := time.Duration(req.TimeoutMs) * time.Millisecond
	if timeout <= 0 || timeout > c.cfg.MaxExecTimeout {
		timeout = c.cfg.MaxExecTimeout
	}
	req.TimeoutMs = timeout.Milliseconds()
	deadline := time.Now().Add(timeout + c.cfg.Grace)
	ctx, cancelDeadline := context.WithDeadlineCause(ctx, deadline, errDeadline)
	defer cancelDeadline()

	st, err := c.startWithRetry(ctx, sandboxID, req)
	if err != nil {
		if ctx.Err() != nil {
			return c.stopped(ctx, sandboxID, req.ExecID)
		}
		return ExecState{}, err
	}
	if Terminal(st.Status) {
		return st, nil
	}

	interval := c.cfg.PollMin
	for {
		wait := c.cfg.LongPoll
		if left := time.Until(deadline); wait > left {
			wait = left
		}
		sent := time.Now()
		st, err = c.PollExec(ctx, sandboxID, req.ExecID, wait)
		switch {
		case ctx.Err() != nil:
			return c.stopped(ctx, sandboxID, req.ExecID)
		case err == nil && Terminal(st.Status):
			return st, nil
		case err == nil && st.Status != StatusRunning:
			return ExecState{}, fmt.Errorf("gateway: exec %s: unknown status %q", req.ExecID, st.Status)
		case errors.Is(err, ErrExecNotFound), err != nil && Classify(err) == Permanent:
			return ExecState{}, err
		case err != nil:
			// Transient or capacity: the exec is still running remotely,
			// so keep asking until the deadline.
			c.log.Debug("poll failed; retrying", "exec_id", req.ExecID, "err", err)
			pause := max(interval, RetryAfter(err))
			interval = min(interval*2, c.cfg.PollMax)
			if !sleep(ctx, pause) {
				return c.stopped(ctx, sandboxID, req.ExecID)
			}
		default:
			// Still running. A long-polling gateway held the request, so
			// ask again at once; one that answered at once gets a growing pause.
			if took := time.Since(sent); took < interval {
				if !sleep(ctx, interval-took) {
					return c.stopped(ctx, sandboxID, req.ExecID)
				}
				interval = min(interval*2, c.cfg.PollMax)
			}
		}
	}
}

// errDeadline is the cause of Run's own deadline, to tell it from the
// caller's cancellation.
var errDeadline = errors.New("gateway: exec deadline passed")

// startWithRetry starts the exec, retrying transient failures for a while.
func (c *Client) startWithRetry(ctx context.Context, sandboxID string, req StartRequest) (ExecState, error) {
	until := time.Now().Add(startRetryWindow)
	pause := 50 * time.Millisecond
	for {
		st, err := c.StartExec(ctx, sandboxID, req)
		if err == nil || !retryableStart(err) || ctx.Err() != nil || time.Now().Add(pause).After(until) {
			return st, err
		}
		c.log.Debug("start failed; retrying", "exec_id", req.ExecID, "err", err)
		if !sleep(ctx, pause) {
			return ExecState{}, ctx.Err()
		}
		pause = min(pause*2, time.Second)
	}
}

// retryableStart reports whether a failed start may be sent again: only
// when no answer came (transport) or the gateway said it was a transient
// fault (5xx, 408). A wrong answer is not retried.
func retryableStart(err error) bool {
	var te *TransportError
	var ae *APIError
	return errors.As(err, &te) || (errors.As(err, &ae) && Classify(ae) == Transient)
}

// stopped handles the end of Run's context: the caller detached, cancelled,
// or Run's own deadline passed. For the last two it cancels the exec and
// reads its final state with a detached, bounded context.
func (c *Client) stopped(ctx context.Context, sandboxID, execID string) (ExecState, error) {
	cause := context.Cause(ctx)
	if errors.Is(cause, ErrDetached) {
		return ExecState{}, fmt.Errorf("exec %s: %w", execID, ErrDetached)
	}
	status, rc := StatusCancelled, ReturnCodeCancelled
	if errors.Is(cause, errDeadline) {
		status, rc = StatusTimeout, ReturnCodeTimeout
	}
	bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.CancelTimeout+2*time.Second)
	defer cancel()
	if err := c.CancelExec(bg, sandboxID, execID); err != nil {
		c.log.Warn("cancel exec failed", "sandbox_id", sandboxID, "exec_id", execID, "err", err)
	}
	// Collect what the exec printed before it was stopped. If it finished
	// on its own in the meantime, that is the truth to report.
	if st, err := c.PollExec(bg, sandboxID, execID, 2*time.Second); err == nil && Terminal(st.Status) {
		if st.Status == StatusCompleted || st.Status == StatusFailed {
			return st, nil
		}
		st.Status, st.ReturnCode = status, &rc
		return st, nil
	}
	return ExecState{ExecID: execID, Status: status, ReturnCode: &rc}, nil
}

// sleep waits d or until ctx ends; it reports whether the full wait passed.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
