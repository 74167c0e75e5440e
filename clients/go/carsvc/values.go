// Package carsvc is the Go worker and client helper for the carsvc sidecar,
// over the code generated from proto/car/v1 (package carv1).
//
// A worker serves agents:
//
//	w := carsvc.NewWorker("127.0.0.1:50051")
//	w.MaxInFlight = 4
//	w.Handle("summarizer", func(ctx context.Context, a *carsvc.AgentContext) (string, error) {
//		a.Progress("reading")
//		return "summary of " + a.Task, nil
//	})
//	err := w.Run(ctx) // until ctx ends or the sidecar drains the worker
//
// A client starts, watches, cancels and answers runs:
//
//	c, _ := carsvc.NewClient("127.0.0.1:50051")
//	run, _ := c.Run(ctx, carsvc.MapReduce(carsvc.Agent("summarizer"), carsvc.Agent("combiner"), "Summarize", items))
//	fmt.Println(run.GetResult().GetMapReduce().GetReducedAnswer())
package carsvc

import (
	"encoding/json"
	"fmt"

	"google.golang.org/protobuf/types/known/structpb"
)

// ToValue converts a Go value to a google.protobuf.Value: nil, bools, numbers,
// strings, []any and map[string]any directly, anything else (structs, typed
// slices and maps) through its JSON encoding.
func ToValue(v any) (*structpb.Value, error) {
	if pv, ok := v.(*structpb.Value); ok {
		return pv, nil
	}
	if pv, err := structpb.NewValue(v); err == nil {
		return pv, nil
	}
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("carsvc: %T is not convertible to a protobuf Value: %w", v, err)
	}
	var plain any
	if err := json.Unmarshal(raw, &plain); err != nil {
		return nil, err
	}
	return structpb.NewValue(plain)
}

// FromValue converts a google.protobuf.Value to plain Go (nil, bool, float64,
// string, []any, map[string]any); a nil Value is nil.
func FromValue(v *structpb.Value) any {
	if v == nil {
		return nil
	}
	return v.AsInterface()
}
