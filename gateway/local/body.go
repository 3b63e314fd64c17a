package local

import (
	"bytes"
	"encoding/json"
	"math"
	"net/http"
	"strconv"

	"github.com/boxq/boxq/gateway"
)

// The request bodies as the server reads them. The wire types of package
// gateway say what a client sends; these say what the server accepts,
// which is more: the seed's Python client coerces cpu, memoryMiB and
// diskMiB with float() (so 5120.0 where a count is meant) and sends None
// for what it has not set. Every number and boolean is therefore read
// raw and checked by name, by number, flag and text below:
//   - a count takes any JSON number with a whole value (5120, 5120.0,
//     5.12e3); a fraction (5120.5) is refused with a message that says so,
//     since rounding a size or a timeout guesses what the client meant;
//   - cpu takes any number (0.5 is a valid share of a core);
//   - null is the same as the field missing, for every field;
//   - a boolean where a number is meant, a number where a boolean is
//     meant, and a string for either, are refused by name.
//
// Strings need nothing: encoding/json leaves a string unset on null.

type createBody struct {
	Image                string          `json:"image"`
	Cwd                  string          `json:"cwd"`
	CPU                  json.RawMessage `json:"cpu"`
	MemoryMiB            json.RawMessage `json:"memoryMiB"`
	TimeoutMs            json.RawMessage `json:"timeoutMs"`
	IdleTimeoutMs        json.RawMessage `json:"idleTimeoutMs"`
	PersistentFilesystem json.RawMessage `json:"persistentFilesystem"`
	LogicalKey           string          `json:"logicalKey"`
	DiskMiB              json.RawMessage `json:"diskMiB"`
}

type startBody struct {
	ExecID    string          `json:"execId"`
	Command   string          `json:"command"`
	Cwd       string          `json:"cwd"`
	TimeoutMs json.RawMessage `json:"timeoutMs"`
	StdinData string          `json:"stdinData"`
}

type terminateBody struct {
	SnapshotBeforeTerminate json.RawMessage `json:"snapshotBeforeTerminate"`
}

// absent reports whether raw is a missing field or a JSON null.
func absent(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

// jsonKindOf names the JSON kind of a raw value for a message.
func jsonKindOf(raw json.RawMessage) string {
	switch raw = bytes.TrimSpace(raw); {
	case len(raw) == 0:
		return "nothing"
	case raw[0] == '"':
		return "a string"
	case raw[0] == 't' || raw[0] == 'f':
		return "a boolean"
	case raw[0] == '[':
		return "an array"
	case raw[0] == '{':
		return "an object"
	}
	return "a number"
}

// number reads field name as any JSON number; null or missing is 0.
func number(name string, raw json.RawMessage) (float64, error) {
	if absent(raw) {
		return 0, nil
	}
	if kind := jsonKindOf(raw); kind != "a number" {
		return 0, badRequest("field %q is %s: want a number", name, kind)
	}
	f, err := strconv.ParseFloat(string(bytes.TrimSpace(raw)), 64)
	if err != nil || math.IsInf(f, 0) {
		return 0, badRequest("field %q is %s: want a number within ±1.8e308", name, bytes.TrimSpace(raw))
	}
	return f, nil
}

// count reads field name as a whole number, from any JSON number with a
// whole value; null or missing is 0.
func count(name string, raw json.RawMessage) (int64, error) {
	if absent(raw) {
		return 0, nil
	}
	text := string(bytes.TrimSpace(raw))
	if n, err := strconv.ParseInt(text, 10, 64); err == nil {
		return n, nil
	}
	f, err := number(name, raw)
	if err != nil {
		return 0, err
	}
	switch {
	case f != math.Trunc(f):
		return 0, badRequest("field %q is %s: want a whole number", name, text)
	case f >= math.MaxInt64 || f <= math.MinInt64:
		return 0, badRequest("field %q is %s: out of range", name, text)
	}
	return int64(f), nil
}

// flag reads field name as a JSON boolean; null or missing is false.
func flag(name string, raw json.RawMessage) (bool, error) {
	if absent(raw) {
		return false, nil
	}
	switch string(bytes.TrimSpace(raw)) {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, badRequest("field %q is %s: want true or false", name, jsonKindOf(raw))
}

// readCreate decodes and converts a create's body.
func readCreate(w http.ResponseWriter, r *http.Request) (gateway.CreateRequest, error) {
	var b createBody
	if err := decodeBody(w, r, &b, false); err != nil {
		return gateway.CreateRequest{}, err
	}
	req := gateway.CreateRequest{Image: b.Image, Cwd: b.Cwd, LogicalKey: b.LogicalKey}
	var err error
	if req.CPU, err = number("cpu", b.CPU); err != nil {
		return req, err
	}
	var mem, disk int64
	if mem, err = count("memoryMiB", b.MemoryMiB); err != nil {
		return req, err
	}
	if disk, err = count("diskMiB", b.DiskMiB); err != nil {
		return req, err
	}
	// Not enforced (see checkCreate): only their sign matters, and a
	// value beyond int is as good as the largest int.
	req.MemoryMiB, req.DiskMiB = int(max(min(mem, math.MaxInt32), math.MinInt32)), int(max(min(disk, math.MaxInt32), math.MinInt32))
	if req.TimeoutMs, err = count("timeoutMs", b.TimeoutMs); err != nil {
		return req, err
	}
	if req.IdleTimeoutMs, err = count("idleTimeoutMs", b.IdleTimeoutMs); err != nil {
		return req, err
	}
	if req.PersistentFilesystem, err = flag("persistentFilesystem", b.PersistentFilesystem); err != nil {
		return req, err
	}
	return req, nil
}

// readStart decodes and converts a start's body.
func readStart(w http.ResponseWriter, r *http.Request) (gateway.StartRequest, error) {
	var b startBody
	if err := decodeBody(w, r, &b, false); err != nil {
		return gateway.StartRequest{}, err
	}
	req := gateway.StartRequest{ExecID: b.ExecID, Command: b.Command, Cwd: b.Cwd, StdinData: b.StdinData}
	var err error
	req.TimeoutMs, err = count("timeoutMs", b.TimeoutMs)
	return req, err
}

// readTerminate decodes and converts a terminate's body, which may be
// empty.
func readTerminate(w http.ResponseWriter, r *http.Request) (gateway.TerminateRequest, error) {
	var b terminateBody
	if err := decodeBody(w, r, &b, true); err != nil {
		return gateway.TerminateRequest{}, err
	}
	snap, err := flag("snapshotBeforeTerminate", b.SnapshotBeforeTerminate)
	return gateway.TerminateRequest{SnapshotBeforeTerminate: snap}, err
}

// waitParam reads the waitMs query parameter, a whole or integral number
// of milliseconds ("1000" or "1000.0"), capped at gateway.MaxWaitMs.
func waitParam(v string) (int64, error) {
	if v == "" {
		return 0, nil
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		f, ferr := strconv.ParseFloat(v, 64)
		if ferr != nil || f != math.Trunc(f) || math.IsInf(f, 0) {
			return 0, badRequest("%s=%q: want a whole number of milliseconds, 0 to %d", gateway.WaitParam, v, gateway.MaxWaitMs)
		}
		ms = int64(max(min(f, gateway.MaxWaitMs), -1))
	}
	if ms < 0 {
		return 0, badRequest("%s=%q: want a whole number of milliseconds, 0 to %d", gateway.WaitParam, v, gateway.MaxWaitMs)
	}
	return min(ms, gateway.MaxWaitMs), nil
}
