package carsvc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"carsvc/clients/go/gen/carv1"
)

type connectStream = grpc.BidiStreamingServer[carv1.ConnectRequest, carv1.ConnectResponse]

// fakeSidecar is a WorkerService on a loopback port: it counts Connects,
// records their authorization metadata, reads the hello and hands the
// stream to serve.
type fakeSidecar struct {
	carv1.UnimplementedWorkerServiceServer
	serve func(n int, stream connectStream) error

	mu       sync.Mutex
	connects int
	auth     []string
}

func (f *fakeSidecar) Connect(stream connectStream) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	f.mu.Lock()
	f.connects++
	n := f.connects
	f.auth = append(f.auth, strings.Join(md.Get("authorization"), ","))
	f.mu.Unlock()
	if _, err := stream.Recv(); err != nil { // the hello
		return err
	}
	return f.serve(n, stream)
}

func (f *fakeSidecar) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.connects
}

func startFake(t *testing.T, serve func(n int, stream connectStream) error) (*fakeSidecar, string) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeSidecar{serve: serve}
	srv := grpc.NewServer()
	carv1.RegisterWorkerServiceServer(srv, f)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return f, lis.Addr().String()
}

// syncBuffer collects the worker's log lines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func testWorker(target string, logs *syncBuffer) *Worker {
	w := NewWorker(target)
	w.WorkerID = "test-worker"
	w.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	w.Handle("a", func(context.Context, *AgentContext) (string, error) { return "ok", nil })
	return w
}

func runWithin(t *testing.T, w *Worker, limit time.Duration) (time.Duration, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	started := time.Now()
	err := w.Run(ctx)
	if ctx.Err() != nil {
		t.Fatalf("Run did not return within %s", limit)
	}
	return time.Since(started), err
}

func TestRefusedCredentialsEndRunWithoutRetrying(t *testing.T) {
	for _, code := range []codes.Code{codes.Unauthenticated, codes.PermissionDenied} {
		for _, reconnect := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/reconnect=%v", code, reconnect), func(t *testing.T) {
				fake, addr := startFake(t, func(int, connectStream) error {
					return status.Error(code, "the bearer token is not a worker token of this sidecar")
				})
				logs := &syncBuffer{}
				w := testWorker(addr, logs)
				w.Token = "w-wrong-token-0001"
				w.Reconnect = reconnect // the backoff cap stays at the default 5 s

				took, err := runWithin(t, w, 10*time.Second)
				if took > 2*time.Second {
					t.Errorf("Run took %s to give up on refused credentials", took)
				}
				var refused *RefusedError
				if !errors.As(err, &refused) {
					t.Fatalf("Run returned %v (%T), want a *RefusedError", err, err)
				}
				if refused.Code != code || status.Code(err) != code {
					t.Errorf("code %s / status.Code %s, want %s", refused.Code, status.Code(err), code)
				}
				want := fmt.Sprintf("carsvc: the sidecar at %s refused the worker's credentials (%s: "+
					"the bearer token is not a worker token of this sidecar); check the worker token", addr, code)
				if err.Error() != want {
					t.Errorf("error %q, want %q", err, want)
				}
				if n := fake.count(); n != 1 {
					t.Errorf("%d Connect attempts, want exactly 1 (no retry)", n)
				}
				if got := fake.auth[0]; got != "Bearer w-wrong-token-0001" {
					t.Errorf("authorization metadata %q", got)
				}
				if n := strings.Count(logs.String(), "level=ERROR"); n != 1 {
					t.Errorf("%d error log lines, want 1:\n%s", n, logs)
				}
				if strings.Contains(logs.String(), "w-wrong-token-0001") {
					t.Errorf("the token was logged:\n%s", logs)
				}
			})
		}
	}
}

func TestOtherFailuresAreRetried(t *testing.T) {
	fake, addr := startFake(t, func(int, connectStream) error {
		return status.Error(codes.Unavailable, "the sidecar is draining and takes no new workers")
	})
	logs := &syncBuffer{}
	w := testWorker(addr, logs)
	w.ReconnectMaxDelay = 50 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for fake.count() < 3 {
		select {
		case err := <-done:
			t.Fatalf("Run returned %v after %d attempts; Unavailable must be retried", err, fake.count())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d attempts in 10s", fake.count())
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run returned %v after its context ended, want nil", err)
	}
	if strings.Contains(logs.String(), "level=ERROR") {
		t.Errorf("a retried failure was logged as an error:\n%s", logs)
	}
}

// drainAtOnce welcomes the worker, drains it, and ends the stream once the
// worker closed its side.
func drainAtOnce(n int, stream connectStream) error {
	err := stream.Send(&carv1.ConnectResponse{
		Welcome: &carv1.WorkerWelcome{SessionId: fmt.Sprintf("s%d", n), HeartbeatIntervalMs: 1000},
		Drain:   &carv1.Drain{Reason: "the sidecar is shutting down", GraceMs: 1000},
	})
	if err != nil {
		return err
	}
	for {
		if _, err := stream.Recv(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

func TestDrainReconnectsByDefault(t *testing.T) {
	fake, addr := startFake(t, drainAtOnce)
	w := testWorker(addr, &syncBuffer{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var sessions []string
	w.OnConnect = func(id string) {
		mu.Lock()
		sessions = append(sessions, id)
		mu.Unlock()
		if id == "s3" {
			cancel()
		}
	}
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the worker did not reconnect after drains (%d connects)", fake.count())
	}
	mu.Lock()
	defer mu.Unlock()
	if strings.Join(sessions, ",") != "s1,s2,s3" {
		t.Errorf("sessions %v, want s1,s2,s3", sessions)
	}
}

func TestStopOnDrainOrNoReconnectReturnsAfterADrain(t *testing.T) {
	for _, name := range []string{"StopOnDrain", "Reconnect=false"} {
		t.Run(name, func(t *testing.T) {
			fake, addr := startFake(t, drainAtOnce)
			w := testWorker(addr, &syncBuffer{})
			if name == "StopOnDrain" {
				w.StopOnDrain = true
			} else {
				w.Reconnect = false
			}
			if _, err := runWithin(t, w, 10*time.Second); err != nil {
				t.Fatalf("Run: %v", err)
			}
			if n := fake.count(); n != 1 {
				t.Errorf("%d connects, want 1", n)
			}
		})
	}
}

func TestMalformedTokenIsRefusedBeforeConnecting(t *testing.T) {
	fake, addr := startFake(t, drainAtOnce)
	w := testWorker(addr, &syncBuffer{})
	w.Token = "two words"
	_, err := runWithin(t, w, 5*time.Second)
	if err == nil || !strings.Contains(err.Error(), "not a valid token") || strings.Contains(err.Error(), "two words") {
		t.Errorf("Run returned %v", err)
	}
	if fake.count() != 0 {
		t.Errorf("connected with a malformed token")
	}
}
