// Command mapreduce-client runs a map-reduce of the example agents
// (clients/README.md) and prints the result; --json prints one JSON object.
//
//	go run ./cmd/mapreduce-client --target 127.0.0.1:50051 --items 10
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"time"

	"carsvc/clients/go/carsvc"
	"carsvc/clients/go/gen/carv1"
)

type summary struct {
	RunID  string `json:"run_id"`
	Status string `json:"status"`
	// Why the run ended (empty reason while it is active): "completed",
	// "agent_failed", ... and a sentence (RunFinished.reason and detail).
	TerminationReason string            `json:"termination_reason"`
	TerminationDetail string            `json:"termination_detail"`
	ReducedAnswer     string            `json:"reduced_answer"`
	Answers           []string          `json:"answers"`
	Errors            []string          `json:"errors"`
	FinishedBy        map[string]string `json:"finished_by"` // agent name -> worker id
	Events            int               `json:"events"`
	// The result was too large to travel inline (over 1 MiB) and was read
	// with ReadRunResult; ResultBytes is its serialized size.
	ResultOmitted bool   `json:"result_omitted"`
	ResultBytes   uint64 `json:"result_bytes"`
}

func main() {
	target := flag.String("target", envOr("CARSVC_TARGET", "127.0.0.1:50051"), "the sidecar's host:port")
	n := flag.Int("items", 5, "number of items (item-1 .. item-N)")
	mapper := flag.String("mapper", "summarizer", "mapper agent")
	reducer := flag.String("reducer", "combiner", "reducer agent")
	maxConcurrent := flag.Uint("max-concurrent", 8, "mappers running at once")
	asJSON := flag.Bool("json", false, "print the result as one JSON object")
	timeout := flag.Duration("timeout", 2*time.Minute, "give up after this long")
	useRun := flag.Bool("run", false, "start and wait with Client.Run instead of watching the events")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	client, err := carsvc.NewClient(*target)
	check(err)
	defer client.Close()

	items := make([]string, *n)
	for i := range items {
		items[i] = fmt.Sprintf("item-%d", i+1)
	}
	pattern := carsvc.MapReduce(carsvc.Agent(*mapper), carsvc.Agent(*reducer), "Summarize each item", items, uint32(*maxConcurrent))
	var run *carv1.Run
	out := summary{FinishedBy: map[string]string{}}
	if *useRun {
		run, err = client.Run(ctx, pattern, carsvc.WithAgentID("mapreduce-client-go"))
		check(err)
		out.RunID = run.RunId
	} else {
		handle, err := client.StartRun(ctx, pattern, carsvc.WithAgentID("mapreduce-client-go"))
		check(err)
		out.RunID = handle.RunId
		// Watch the events; a broken watch resumes after the last seq it saw.
		var lastSeq uint64
		for done := false; !done; {
			for ev, err := range client.Watch(ctx, handle.RunId, lastSeq) {
				if err != nil {
					if ctx.Err() != nil {
						check(err)
					}
					fmt.Fprintln(os.Stderr, "watch broke, resuming after seq", lastSeq, ":", err)
					time.Sleep(200 * time.Millisecond)
					break
				}
				lastSeq = ev.Seq
				out.Events++
				if f := ev.GetAgentFinished(); f != nil {
					out.FinishedBy[f.GetOutput().GetName()] = f.WorkerId
				}
				if ev.GetRunFinished() != nil {
					done = true
				}
			}
		}
		// GetRun reads a result too large to travel inline (ReadRunResult).
		run, err = client.GetRun(ctx, handle.RunId)
		check(err)
	}
	out.ResultOmitted, out.ResultBytes = run.ResultOmitted, run.ResultBytes
	result := run.GetResult().GetMapReduce()
	out.Status = run.Status.String()
	out.TerminationReason, out.TerminationDetail = run.TerminationReason, run.TerminationDetail
	out.ReducedAnswer = result.GetReducedAnswer()
	for _, o := range result.GetMapOutputs() {
		out.Answers = append(out.Answers, o.Answer)
		out.Errors = append(out.Errors, o.GetError())
	}
	if *asJSON {
		check(json.NewEncoder(os.Stdout).Encode(out))
	} else {
		fmt.Printf("run %s: %s\n", out.RunID, out.Status)
		if run.Status != carv1.RunStatus_RUN_STATUS_SUCCEEDED {
			fmt.Printf("  why: %s (%s)\n", out.TerminationDetail, out.TerminationReason)
		}
		for i, o := range result.GetMapOutputs() {
			fmt.Printf("  %-14s %-20s by %s\n", o.Name, o.Answer+o.GetError(), out.FinishedBy[o.Name])
			_ = i
		}
		fmt.Println("reduced:", out.ReducedAnswer)
	}
	if run.Status != carv1.RunStatus_RUN_STATUS_SUCCEEDED {
		fmt.Fprintf(os.Stderr, "mapreduce-client: run %s %s: %s: %s\n", out.RunID, out.Status, out.TerminationReason, out.TerminationDetail)
		os.Exit(1)
	}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "mapreduce-client:", err)
		os.Exit(1)
	}
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}
