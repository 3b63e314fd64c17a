package main

import (
	"context"
	"time"

	"github.com/boxq/boxq/gateway"
)

// instantGateway is a gateway that does no work: every sandbox is created
// and every exec completes at once, in memory. Against it, the pipeline
// measures what boxq itself costs per job: the queue, the pool's lease and
// the result write.
type instantGateway struct{}

// Create implements sandboxpool.Gateway.
func (instantGateway) Create(_ context.Context, key string, _ gateway.CreateRequest) (string, error) {
	return "sb-" + key, nil
}

// Terminate implements sandboxpool.Gateway.
func (instantGateway) Terminate(context.Context, string, bool) error { return nil }

// Run implements jobs.Gateway: the exec completes at once with no output.
func (instantGateway) Run(_ context.Context, _ string, req gateway.StartRequest) (gateway.ExecState, error) {
	rc := 0
	return gateway.ExecState{ExecID: req.ExecID, Status: gateway.StatusCompleted, ReturnCode: &rc}, nil
}

// PollExec implements jobs.Gateway.
func (instantGateway) PollExec(_ context.Context, _, execID string, _ time.Duration) (gateway.ExecState, error) {
	rc := 0
	return gateway.ExecState{ExecID: execID, Status: gateway.StatusCompleted, ReturnCode: &rc}, nil
}

// CancelExec implements jobs.Gateway: there is never anything to cancel.
func (instantGateway) CancelExec(context.Context, string, string) error { return nil }
