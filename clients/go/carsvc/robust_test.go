package carsvc

// Undecodable frames, deep values, 16 MiB messages and the reconnect cap,
// against real gRPC servers on loopback.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"carsvc/clients/go/gen/carv1"
)

// rawFrame is sent as is by the test servers' codec: bytes no protobuf
// decoder accepts, or a message built by hand.
type rawFrame []byte

// mixedCodec is the proto codec, except that a rawFrame is sent verbatim and
// an incoming message is kept raw when the handler asks for a *rawFrame.
type mixedCodec struct{}

func (mixedCodec) Marshal(v any) ([]byte, error) {
	if raw, ok := v.(rawFrame); ok {
		return raw, nil
	}
	return proto.Marshal(v.(proto.Message))
}

func (mixedCodec) Unmarshal(data []byte, v any) error {
	if raw, ok := v.(*rawFrame); ok {
		*raw = append(rawFrame(nil), data...)
		return nil
	}
	return proto.Unmarshal(data, v.(proto.Message))
}

func (mixedCodec) Name() string { return "proto" }

var _ encoding.Codec = mixedCodec{}

// serverOptions: the test servers take and send messages up to 64 MiB.
func serverOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ForceServerCodec(mixedCodec{}), grpc.MaxRecvMsgSize(64 << 20), grpc.MaxSendMsgSize(64 << 20),
	}
}

// garbage is no ConnectResponse or Run: field 1, length-delimited, with a
// length far past the end of the message.
var garbage = rawFrame{0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01}

// deepValue is a JSON object nested depth levels deep: {"a": {"a": ... 1}}.
func deepValue(depth int) *structpb.Value {
	v := structpb.NewNumberValue(1)
	for range depth {
		v = structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{"a": v}})
	}
	return v
}

// depthOf is the JSON nesting depth of a decoded value (0 for a scalar).
func depthOf(v any) int {
	switch v := v.(type) {
	case map[string]any:
		d := 0
		for _, x := range v {
			d = max(d, depthOf(x))
		}
		return d + 1
	case []any:
		d := 0
		for _, x := range v {
			d = max(d, depthOf(x))
		}
		return d + 1
	}
	return 0
}

// assignment is a ConnectResponse handing out one assignment for agent "a".
func assignment(id, task string) *carv1.ConnectResponse {
	return &carv1.ConnectResponse{Assignments: []*carv1.Assignment{{
		AssignmentId: id, Attempt: 1, RunId: "r-" + id, Agent: "a", Task: task,
		Spec: &carv1.AgentSpec{Name: "a"},
	}}}
}

func welcome(n int) *carv1.ConnectResponse {
	return &carv1.ConnectResponse{Welcome: &carv1.WorkerWelcome{SessionId: fmt.Sprintf("s%d", n), HeartbeatIntervalMs: 2000}}
}

// awaitResult reads frames until the result of assignment id arrives.
func awaitResult(stream connectStream, id string) (*carv1.AssignmentResult, error) {
	for {
		req, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		for _, r := range req.Results {
			if r.AssignmentId == id {
				return r, nil
			}
		}
	}
}

// serveOne welcomes the worker, hands it one assignment and reports its result.
func serveOne(n int, stream connectStream, task string, results chan<- *carv1.AssignmentResult) error {
	if err := stream.Send(welcome(n)); err != nil {
		return err
	}
	id := fmt.Sprintf("as-%d", n)
	if err := stream.Send(assignment(id, task)); err != nil {
		return err
	}
	r, err := awaitResult(stream, id)
	if err != nil {
		return err
	}
	results <- r
	<-stream.Context().Done() // keep the session until the worker goes
	return nil
}

func startRawFake(t *testing.T, serve func(n int, stream connectStream) error) (*fakeSidecar, string) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeSidecar{serve: serve}
	srv := grpc.NewServer(serverOptions()...)
	carv1.RegisterWorkerServiceServer(srv, f)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return f, lis.Addr().String()
}

func TestAnUndecodableFrameIsLoggedAndTheWorkerReconnects(t *testing.T) {
	// Go's protobuf parser allows 10,000 nested messages; 3,400 JSON levels
	// are 10,201 of them.
	tooDeep, err := proto.Marshal(&carv1.ConnectResponse{CallResults: []*carv1.CallResult{{
		CallId: "1", Result: &carv1.CallResult_StateGet{StateGet: &carv1.StateGetResult{Found: true, Value: deepValue(3400)}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		welcome bool // welcome the worker before the bad frame
		frame   rawFrame
	}{
		{"garbage instead of the welcome", false, garbage},
		{"garbage after the welcome", true, garbage},
		{"a value nested past the parser's limit", true, rawFrame(tooDeep)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			results := make(chan *carv1.AssignmentResult, 1)
			fake, addr := startRawFake(t, func(n int, stream connectStream) error {
				if n == 1 {
					if tc.welcome {
						if err := stream.Send(welcome(n)); err != nil {
							return err
						}
					}
					if err := stream.SendMsg(tc.frame); err != nil {
						return err
					}
					<-stream.Context().Done()
					return nil
				}
				return serveOne(n, stream, "after the bad frame", results)
			})
			logs := &syncBuffer{}
			w := testWorker(addr, logs)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- w.Run(ctx) }()
			select {
			case r := <-results:
				if r.Output.GetAnswer() != "ok" || r.Attempt != 1 {
					t.Errorf("result after the reconnect: %v", r)
				}
			case err := <-done:
				t.Fatalf("Run returned %v after an undecodable frame; it must reconnect", err)
			case <-time.After(10 * time.Second):
				t.Fatalf("no result within 10 s (%d connects)\n%s", fake.count(), logs)
			}
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run returned %v after its context ended", err)
			}
			line := ""
			for _, l := range strings.Split(logs.String(), "\n") {
				if strings.Contains(l, "could not be decoded") {
					line = l
				}
			}
			t.Log(line)
			if !strings.Contains(line, "level=ERROR") || !strings.Contains(line, "reconnecting") ||
				!strings.Contains(line, "in=100ms") || !strings.Contains(line, "err=") {
				t.Errorf("no clear error log line for the undecodable frame:\n%s", logs)
			}
		})
	}
}

func TestWithoutReconnectAnUndecodableFrameEndsRunWithATypedError(t *testing.T) {
	_, addr := startRawFake(t, func(n int, stream connectStream) error {
		if err := stream.Send(welcome(n)); err != nil {
			return err
		}
		if err := stream.SendMsg(garbage); err != nil {
			return err
		}
		<-stream.Context().Done()
		return nil
	})
	logs := &syncBuffer{}
	w := testWorker(addr, logs)
	w.Reconnect = false
	_, err := runWithin(t, w, 10*time.Second)
	var undecodable *UndecodableFrameError
	if !errors.As(err, &undecodable) || status.Code(err) != codes.Internal {
		t.Fatalf("Run returned %v (%T), want an *UndecodableFrameError wrapping codes.Internal", err, err)
	}
	if !strings.HasPrefix(err.Error(), "carsvc: a frame from the sidecar could not be decoded: ") {
		t.Errorf("error text %q", err)
	}
}

func TestA24LevelValueReachesTheHandler(t *testing.T) {
	results := make(chan *carv1.AssignmentResult, 1)
	_, addr := startRawFake(t, func(n int, stream connectStream) error {
		if err := stream.Send(welcome(n)); err != nil {
			return err
		}
		if err := stream.Send(assignment("deep", "read")); err != nil {
			return err
		}
		for {
			req, err := stream.Recv()
			if err != nil {
				return err
			}
			for _, c := range req.Calls {
				if c.GetStateGet() != nil {
					err := stream.Send(&carv1.ConnectResponse{CallResults: []*carv1.CallResult{{CallId: c.CallId,
						Result: &carv1.CallResult_StateGet{StateGet: &carv1.StateGetResult{Found: true, Value: deepValue(24)}}}}})
					if err != nil {
						return err
					}
				}
			}
			for _, r := range req.Results {
				results <- r
				<-stream.Context().Done()
				return nil
			}
		}
	})
	w := testWorker(addr, &syncBuffer{})
	w.Handle("a", func(ctx context.Context, a *AgentContext) (string, error) {
		v, found, err := a.StateGet(ctx, "deep")
		if err != nil || !found {
			return "", fmt.Errorf("state_get: found=%v err=%v", found, err)
		}
		return fmt.Sprint(depthOf(v)), nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = w.Run(ctx) }()
	select {
	case r := <-results:
		if r.Output.GetAnswer() != "24" {
			t.Errorf("the handler saw %q (error %q), want depth 24", r.Output.GetAnswer(), r.Output.GetError())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no result within 10 s")
	}
}

func TestMessagesOver4MiBBothWays(t *testing.T) {
	big := strings.Repeat("x", 6<<20)
	results := make(chan *carv1.AssignmentResult, 1)
	_, addr := startRawFake(t, func(n int, stream connectStream) error {
		return serveOne(n, stream, big, results)
	})
	w := testWorker(addr, &syncBuffer{})
	w.Handle("a", func(_ context.Context, a *AgentContext) (string, error) { return a.Task + "!", nil })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = w.Run(ctx) }()
	select {
	case r := <-results:
		if len(r.Output.GetAnswer()) != len(big)+1 {
			t.Errorf("answer of %d bytes (error %q), want %d", len(r.Output.GetAnswer()), r.Output.GetError(), len(big)+1)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no result for a 6 MiB task within 20 s")
	}
}

func TestMaxMessageBytesIsConfigurable(t *testing.T) {
	_, addr := startRawFake(t, func(n int, stream connectStream) error {
		if err := stream.Send(welcome(n)); err != nil {
			return err
		}
		if err := stream.Send(assignment("big", strings.Repeat("x", 2<<20))); err != nil {
			return err
		}
		<-stream.Context().Done()
		return nil
	})
	w := testWorker(addr, &syncBuffer{})
	w.MaxMessageBytes = 1 << 20
	w.Reconnect = false
	_, err := runWithin(t, w, 10*time.Second)
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("Run returned %v, want ResourceExhausted for a 2 MiB frame over a 1 MiB limit", err)
	}
}

// runServer is a RunService answering every call from respond, in raw frames.
func runServer(t *testing.T, respond func(method string) []rawFrame) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	handler := func(_ any, stream grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(stream)
		var req rawFrame
		if err := stream.RecvMsg(&req); err != nil {
			return err
		}
		for _, frame := range respond(method) {
			if err := stream.SendMsg(frame); err != nil {
				return err
			}
		}
		return nil
	}
	srv := grpc.NewServer(append(serverOptions(), grpc.UnknownServiceHandler(handler))...)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}

func marshal(t *testing.T, m proto.Message) rawFrame {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestClientDecodesA24LevelEvidenceValueInAWatch(t *testing.T) {
	finished := &carv1.RunEvent{Seq: 7, Kind: &carv1.RunEvent_RunFinished{RunFinished: &carv1.RunFinished{
		Status: carv1.RunStatus_RUN_STATUS_SUCCEEDED,
		Result: &carv1.RunResult{Result: &carv1.RunResult_MapReduce{MapReduce: &carv1.MapReduceResult{
			ReducerOutput: &carv1.AgentOutput{Name: "r", Outcome: &carv1.AgentOutcome{
				Evidence: []*carv1.Evidence{{Description: "deep", Data: deepValue(24)}},
			}},
		}}},
	}}}
	addr := runServer(t, func(string) []rawFrame {
		return []rawFrame{marshal(t, &carv1.WatchRunResponse{Events: []*carv1.RunEvent{finished}})}
	})
	c, err := NewClient(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var got []*carv1.RunEvent
	for ev, err := range c.Watch(ctx, "r1", 0) {
		if err != nil {
			t.Fatalf("Watch: %v", err)
		}
		got = append(got, ev)
	}
	if len(got) != 1 {
		t.Fatalf("%d events, want 1", len(got))
	}
	data := got[0].GetRunFinished().GetResult().GetMapReduce().GetReducerOutput().GetOutcome().GetEvidence()[0].GetData()
	if d := depthOf(FromValue(data)); d != 24 {
		t.Errorf("evidence data nested %d deep, want 24", d)
	}
}

func TestClientCallsReturnAClearErrorForAnUndecodableResponse(t *testing.T) {
	addr := runServer(t, func(string) []rawFrame { return []rawFrame{garbage} })
	c, err := NewClient(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = c.GetRun(ctx, "r1")
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "unmarshal") {
		t.Errorf("GetRun returned %v, want codes.Internal naming the failed unmarshal", err)
	}
	for _, err := range c.Watch(ctx, "r1", 0) {
		if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "unmarshal") {
			t.Errorf("Watch yielded %v, want codes.Internal naming the failed unmarshal", err)
		}
	}
	if ctx.Err() != nil {
		t.Errorf("the calls hung until the test's deadline")
	}
}

func TestClientReceivesMessagesOver4MiB(t *testing.T) {
	big := strings.Repeat("y", 6<<20)
	addr := runServer(t, func(string) []rawFrame {
		return []rawFrame{marshal(t, &carv1.GetRunResponse{Run: &carv1.Run{RunId: "r1", Result: &carv1.RunResult{
			Result: &carv1.RunResult_Single{Single: &carv1.SingleResult{Output: &carv1.AgentOutput{Answer: big}}},
		}}})}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := NewClient(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	run, err := c.GetRun(ctx, "r1")
	if err != nil {
		t.Fatalf("GetRun of a 6 MiB run: %v", err)
	}
	if n := len(run.GetResult().GetSingle().GetOutput().GetAnswer()); n != len(big) {
		t.Errorf("answer of %d bytes, want %d", n, len(big))
	}

	small, err := NewClient(addr, MaxMessageBytes(1<<20))
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	if _, err := small.GetRun(ctx, "r1"); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("with MaxMessageBytes(1 MiB) GetRun returned %v, want ResourceExhausted", err)
	}
}

func TestReconnectsWithinTheCapAfterAnOutage(t *testing.T) {
	const capDelay = time.Second
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	var mu sync.Mutex
	var welcomed []time.Time
	serve := func(n int, stream connectStream) error {
		if err := stream.Send(welcome(n)); err != nil {
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
	start := func(lis net.Listener) *grpc.Server {
		srv := grpc.NewServer(serverOptions()...)
		carv1.RegisterWorkerServiceServer(srv, &fakeSidecar{serve: serve})
		go func() { _ = srv.Serve(lis) }()
		return srv
	}
	srv := start(lis)
	logs := &syncBuffer{}
	w := testWorker(addr, logs)
	w.ReconnectMaxDelay = capDelay
	connected := make(chan struct{}, 4)
	w.OnConnect = func(string) {
		mu.Lock()
		welcomed = append(welcomed, time.Now())
		mu.Unlock()
		connected <- struct{}{}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = w.Run(ctx) }()
	select {
	case <-connected:
	case <-time.After(10 * time.Second):
		t.Fatal("the worker never connected")
	}

	srv.Stop() // the sidecar is down for 4 caps
	time.Sleep(4 * capDelay)
	lis, err = net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listening again on %s: %v", addr, err)
	}
	back := time.Now()
	srv = start(lis)
	defer srv.Stop()
	select {
	case <-connected:
		if took := time.Since(back); took > capDelay+3*time.Second {
			t.Errorf("reconnected %s after the sidecar came back; the cap is %s", took, capDelay)
		}
	case <-time.After(capDelay + 3*time.Second):
		t.Fatalf("not reconnected within cap + 3 s of the sidecar's return\n%s", logs)
	}
	// Each failed attempt logged once, with its delay, and no delay past the cap.
	delays := regexp.MustCompile(`reconnecting".* in=(\S+) attempt=(\d+)`).FindAllStringSubmatch(logs.String(), -1)
	if len(delays) < 3 {
		t.Fatalf("%d reconnect log lines during a 4 s outage, want one per attempt:\n%s", len(delays), logs)
	}
	for i, m := range delays {
		d, err := time.ParseDuration(m[1])
		if err != nil || d > capDelay {
			t.Errorf("attempt %s logged delay %q, past the cap %s", m[2], m[1], capDelay)
		}
		if m[2] != fmt.Sprint(i+1) {
			t.Errorf("log line %d is attempt %s", i+1, m[2])
		}
	}
}
