// Command otel-worker is a worker whose program uses OpenTelemetry: it exports
// its spans with OTLP/gRPC (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME and
// the other standard variables), so each agent's "invoke_agent" span, made by
// the SDK as a child of the sidecar's span of the step, and the handler's own
// "chat" span under it join the client's trace (docs/operations.md, "Traces";
// tests/crosslang/test_tracing.py runs it).
//
//	go run . --target 127.0.0.1:50051 --agent traced-go
//
// It is a module of its own, so the SDK's module does not depend on the
// OpenTelemetry SDK and exporter: the SDK needs only the OpenTelemetry API.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"carsvc/clients/go/carsvc"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051", "the sidecar's host:port")
	agent := flag.String("agent", "traced-go", "the agent to serve")
	workerID := flag.String("worker-id", "", "worker id (default host-pid)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	exporter, err := otlptracegrpc.New(ctx, otlptracegrpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, "otel-worker:", err)
		os.Exit(1)
	}
	// Each span is exported as it ends (a batch would wait): the test reads them at once.
	provider := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exporter))
	defer func() { _ = provider.Shutdown(context.Background()) }()
	otel.SetTracerProvider(provider)

	w := carsvc.NewWorker(*target)
	if *workerID != "" {
		w.WorkerID = *workerID
	}
	w.OnConnect = func(session string) { fmt.Printf("ready %s %s\n", w.WorkerID, session) }
	tracer := otel.Tracer("otel-worker")
	w.Handle(*agent, func(ctx context.Context, a *carsvc.AgentContext) (string, error) {
		// The handler's own work (a model call) is a child of the agent's span.
		_, chat := tracer.Start(ctx, "chat fake-model", trace.WithSpanKind(trace.SpanKindClient),
			trace.WithAttributes(
				attribute.String("gen_ai.operation.name", "chat"),
				attribute.String("gen_ai.request.model", "fake-model"),
			))
		chat.End()
		a.ReportUsage(10, 5, 0.001)
		return "go: " + a.Task, nil
	})
	if err := w.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(1)
	}
}
