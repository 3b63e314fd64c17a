package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/jobs"
)

// fixedPollInterval is the Python client's pause between two polls.
const fixedPollInterval = 250 * time.Millisecond

// idleGap is the most a latency measurement waits between two samples, a
// random time, so that jobs arrive at any phase of the worker's idle
// polling, as they do in real use.
const idleGap = 20 * time.Millisecond

// rttSample is one job's round trip and its parts, by the clocks of the
// producer and of the worker (one machine, so they agree): from Enqueue to
// the handler's start (the enqueue, and the wait for the worker to poll),
// the handler up to the result (lease, exec, parse), and from there to the
// producer holding the result (release and result write, publish, decode).
type rttSample struct {
	total, pickup, handler, notify time.Duration
}

// pipelineRTT measures, one job at a time on an idle worker, the time from
// Enqueue to the result seen by the producer, for commands of one task.
func (e *env) pipelineRTT(ctx context.Context, g *gatewayServer, commands []string, samples int) ([][]rttSample, error) {
	client, err := e.client(g)
	if err != nil {
		return nil, err
	}
	r, err := e.startRig(ctx, client, e.opts.concurrency, e.opts.checkInterval)
	if err != nil {
		return nil, err
	}
	defer r.stop()
	w, err := r.prod.Subscribe(ctx)
	if err != nil {
		return nil, err
	}
	defer w.Close()
	task := "rtt-" + uuid.NewString()
	one := func(command string) (rttSample, error) {
		job := jobs.Job{TaskID: task, Command: command}
		start := time.Now()
		enq, err := r.prod.Enqueue(ctx, job, w.Channel())
		if err != nil {
			return rttSample{}, err
		}
		w.Add(enq)
		res, err := w.Next(ctx)
		end := time.Now()
		if err != nil {
			return rttSample{}, err
		}
		if res.Status != jobs.StatusCompleted || res.ReturnCode != 0 {
			return rttSample{}, fmt.Errorf("job %q: %s, rc %d: %s%s", command, res.Status, res.ReturnCode, res.Error, res.Output)
		}
		return rttSample{
			total:   end.Sub(start),
			pickup:  res.StartedAt.Sub(start),
			handler: res.FinishedAt.Sub(res.StartedAt),
			notify:  end.Sub(res.FinishedAt),
		}, nil
	}
	out := make([][]rttSample, len(commands))
	for i, command := range commands {
		// Warm up: the task's sandbox, connections, scripts.
		for range 5 {
			if _, err := one(command); err != nil {
				return nil, err
			}
		}
		for range samples {
			if !pause(ctx, rand.N(idleGap)) {
				return nil, ctx.Err()
			}
			d, err := one(command)
			if err != nil {
				return nil, err
			}
			out[i] = append(out[i], d)
		}
	}
	return out, nil
}

// parts returns one part of each sample.
func parts(samples []rttSample, part func(rttSample) time.Duration) []time.Duration {
	out := make([]time.Duration, len(samples))
	for i, s := range samples {
		out[i] = part(s)
	}
	return out
}

// directRTT measures boxq's gateway client alone, no queue: Run of command
// in one sandbox, one at a time.
func (e *env) directRTT(ctx context.Context, g *gatewayServer, command string, samples int) ([]time.Duration, error) {
	client, err := e.client(g)
	if err != nil {
		return nil, err
	}
	sb, err := client.Create(ctx, uuid.NewString(), gateway.CreateRequest{Cwd: gateway.DefaultCwd})
	if err != nil {
		return nil, err
	}
	defer client.Terminate(context.WithoutCancel(ctx), sb, false)
	return timeExecs(ctx, command, 5, samples, func() (gateway.ExecState, error) {
		return client.Run(ctx, sb, gateway.StartRequest{ExecID: uuid.NewString(), Command: command, TimeoutMs: 60_000})
	})
}

// timeExecs runs warmup+samples execs of command one at a time, each after
// a random idle gap, and returns how long each of the last samples took.
// Every exec must complete.
func timeExecs(ctx context.Context, command string, warmup, samples int, run func() (gateway.ExecState, error)) ([]time.Duration, error) {
	var out []time.Duration
	for i := range warmup + samples {
		if !pause(ctx, rand.N(idleGap)) {
			return nil, ctx.Err()
		}
		start := time.Now()
		st, err := run()
		took := time.Since(start)
		if err != nil {
			return nil, err
		}
		if st.Status != gateway.StatusCompleted {
			return nil, fmt.Errorf("exec %q: %s, rc %d: %s", command, st.Status, st.RC(), st.Output)
		}
		if i >= warmup {
			out = append(out, took)
		}
	}
	return out, nil
}

// fixedPollRTT measures a client that does what the Python client does:
// start the exec (and take a terminal answer to the start as the result),
// poll at once, then every 250 ms.
func (e *env) fixedPollRTT(ctx context.Context, g *gatewayServer, command string, samples int) ([]time.Duration, error) {
	client, err := e.client(g)
	if err != nil {
		return nil, err
	}
	sb, err := client.Create(ctx, uuid.NewString(), gateway.CreateRequest{Cwd: gateway.DefaultCwd})
	if err != nil {
		return nil, err
	}
	defer client.Terminate(context.WithoutCancel(ctx), sb, false)
	t := gateway.NewTransport()
	defer t.CloseIdleConnections()
	fp := &fixedPoller{http: &http.Client{Transport: t}, base: g.url, token: e.token}
	return timeExecs(ctx, command, 2, samples, func() (gateway.ExecState, error) {
		return fp.run(ctx, sb, command)
	})
}

// fixedPoller is a minimal gateway client with the Python client's loop.
type fixedPoller struct {
	http  *http.Client
	base  string
	token string
}

func (f *fixedPoller) run(ctx context.Context, sandboxID, command string) (gateway.ExecState, error) {
	execID := uuid.NewString()
	path := "/v1/sandboxes/" + url.PathEscape(sandboxID) + "/execs"
	var st gateway.ExecState
	if err := f.call(ctx, http.MethodPost, path, gateway.StartRequest{ExecID: execID, Command: command, TimeoutMs: 60_000}, &st); err != nil {
		return st, err
	}
	for !gateway.Terminal(st.Status) {
		if err := f.call(ctx, http.MethodGet, path+"/"+url.PathEscape(execID), nil, &st); err != nil {
			return st, err
		}
		if gateway.Terminal(st.Status) {
			break
		}
		if !pause(ctx, fixedPollInterval) {
			return st, ctx.Err()
		}
	}
	return st, nil
}

func (f *fixedPoller) call(ctx context.Context, method, path string, body, v any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, f.base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+f.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := f.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("%s %s: HTTP %d: %s", method, path, resp.StatusCode, b)
	}
	return json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(v)
}

// pause waits d or until ctx ends; it reports whether the wait was full.
func pause(ctx context.Context, d time.Duration) bool {
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

// percentile returns the p-th percentile (0 < p ≤ 100) of ds, nearest rank.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	rank := int(p/100*float64(len(s))+0.999999) - 1
	return s[min(max(rank, 0), len(s)-1)]
}
