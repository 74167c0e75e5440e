// Command summarizer-worker serves the example agents of clients/README.md:
// "summarizer" (a map-reduce mapper), "combiner" (its reducer) and "deployer"
// (a single agent that asks a human before it deploys).
//
//	go run ./cmd/summarizer-worker --target 127.0.0.1:50051
//
// --target (or CARSVC_TARGET) may name several sidecar replicas, separated by
// commas: the worker connects to the first that answers and moves on to the
// next when its session ends. CARSVC_WORKER_TOKEN, when set, is the worker token (never a flag: a command
// line is visible to every local user).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"

	"carsvc/clients/go/carsvc"
)

const itemMarker = "Process this item: "

func main() {
	target := flag.String("target", envOr("CARSVC_TARGET", "127.0.0.1:50051"), "the sidecar's host:port, or several separated by commas")
	workerID := flag.String("worker-id", "", "worker id (default host-pid)")
	agents := flag.String("agents", "summarizer,combiner,deployer,pinger,ponger", "comma-separated agents to serve")
	maxInFlight := flag.Int("max-in-flight", 4, "assignments held at once")
	sleepMs := flag.Int("sleep-ms", 0, "milliseconds each summary takes (stands in for a model call)")
	flag.Parse()

	w := carsvc.NewWorker(*target)
	if *workerID != "" {
		w.WorkerID = *workerID
	}
	w.MaxInFlight = *maxInFlight
	w.Token = os.Getenv("CARSVC_WORKER_TOKEN")
	w.Labels = map[string]string{"lang": "go"}
	w.OnConnect = func(session string) { fmt.Printf("ready %s %s\n", w.WorkerID, session) }
	handlers := map[string]carsvc.Handler{
		"summarizer": summarize(w.WorkerID, time.Duration(*sleepMs)*time.Millisecond),
		"combiner":   combine,
		"deployer":   deploy,
		"pinger":     ping(w.WorkerID),
		"ponger":     pong(w.WorkerID),
	}
	for _, name := range strings.Split(*agents, ",") {
		h, ok := handlers[name]
		if !ok {
			fmt.Fprintf(os.Stderr, "unknown agent %q\n", name)
			os.Exit(2)
		}
		w.Handle(name, logged(h))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := w.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(1)
	}
}

// logged prints one line per assignment so a test can tell who holds what.
func logged(h carsvc.Handler) carsvc.Handler {
	return func(ctx context.Context, a *carsvc.AgentContext) (string, error) {
		fmt.Printf("started %s %s %d\n", a.AssignmentID, a.AgentName, a.Attempt)
		return h(ctx, a)
	}
}

// summarize answers "summary(<item>)" after recording the item in the run's
// state and emitting a "summarized" event.
func summarize(workerID string, sleep time.Duration) carsvc.Handler {
	return func(ctx context.Context, a *carsvc.AgentContext) (string, error) {
		item := a.Task
		if i := strings.LastIndex(item, itemMarker); i >= 0 {
			item = item[i+len(itemMarker):]
		}
		a.Progress("summarizing " + item)
		key := "summaries/" + item
		if _, err := a.StateSet(ctx, key, map[string]any{"worker": workerID, "sdk": "go"}); err != nil {
			return "", err
		}
		if got, found, err := a.StateGet(ctx, key); err != nil || !found {
			return "", fmt.Errorf("state read back failed: %v %v %v", got, found, err)
		}
		if err := a.Emit("summarized", map[string]any{"item": item, "worker": workerID}); err != nil {
			return "", err
		}
		select {
		case <-ctx.Done():
			return "", context.Cause(ctx)
		case <-time.After(sleep):
		}
		a.ReportUsage(uint64(len(a.Task)), uint64(len(item)), 0)
		return "summary(" + item + ")", nil
	}
}

// combine joins the mapper answers listed in the reducer's task.
func combine(_ context.Context, a *carsvc.AgentContext) (string, error) {
	var answers []string
	for _, line := range strings.Split(a.Task, "\n") {
		if strings.HasPrefix(line, "- [") {
			if i := strings.Index(line, "] "); i >= 0 {
				answers = append(answers, line[i+2:])
			}
		}
	}
	return fmt.Sprintf("combined %d: %s", len(answers), strings.Join(answers, "; ")), nil
}

// deploy asks a human before it "deploys" the task's target.
func deploy(ctx context.Context, a *carsvc.AgentContext) (string, error) {
	d, err := a.SuspendToolCall(ctx, "deploy-1", "deploy", map[string]any{"target": a.Task},
		carsvc.SuspendOptions{Reason: "deploys to " + a.Task, Timeout: 5 * time.Minute})
	if err != nil {
		return "", err
	}
	if !d.Approved {
		return "denied: " + d.Reason, nil
	}
	if s, ok := d.Result.(string); ok {
		return "approved: " + s, nil
	}
	raw, _ := json.Marshal(d.Result)
	return "approved: " + string(raw), nil
}

// ping sends "ping from <worker>" to the run's "ponger" (retrying while the
// ponger has not started yet) and answers with the reply it receives.
func ping(workerID string) carsvc.Handler {
	return func(ctx context.Context, a *carsvc.AgentContext) (string, error) {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := a.Send(ctx, "ponger", "ping from "+workerID)
			var refused *carsvc.CallError
			if err == nil {
				break
			} else if !errors.As(err, &refused) || refused.Code != codes.NotFound || time.Now().After(deadline) {
				return "", err
			}
			time.Sleep(50 * time.Millisecond)
		}
		m, err := a.Recv(ctx, 10*time.Second)
		if err != nil {
			return "", err
		}
		return "pinger got " + m.GetPayload().GetStringValue(), nil
	}
}

// pong waits for a message, answers its sender with "pong from <worker>".
func pong(workerID string) carsvc.Handler {
	return func(ctx context.Context, a *carsvc.AgentContext) (string, error) {
		m, err := a.Recv(ctx, 10*time.Second)
		if err != nil {
			return "", err
		}
		if err := a.Send(ctx, m.FromAgent, "pong from "+workerID); err != nil {
			return "", err
		}
		return "ponger got " + m.GetPayload().GetStringValue() + " from " + m.FromAgent, nil
	}
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}
