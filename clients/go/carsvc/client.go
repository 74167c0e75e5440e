package carsvc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/structpb"

	"carsvc/clients/go/gen/carv1"
)

// Client starts, watches, inspects, cancels and answers runs. The generated
// stubs are exported for everything the helpers do not cover.
type Client struct {
	Conn     *grpc.ClientConn
	Runs     carv1.RunServiceClient
	Events   carv1.EventServiceClient
	Registry carv1.RegistryServiceClient
	State    carv1.StateServiceClient
	Budgets  carv1.BudgetServiceClient

	addresses int // how many sidecar addresses the client was given
}

// ClientReconnectMaxDelay caps gRPC's reconnect backoff on a client's
// channel (gRPC's own default grows to 120 s), so calls succeed again within
// a few seconds after a sidecar outage.
const ClientReconnectMaxDelay = 5 * time.Second

// NewClient connects (lazily) to the sidecar at target ("host:port"). The
// channel is plaintext, sends and receives messages up to
// DefaultMaxMessageBytes (16 MiB; change it with MaxMessageBytes(n)) and
// caps its reconnect backoff at ClientReconnectMaxDelay; opts come after
// these defaults, so they override them.
//
// target may name several replicas, separated by commas ("h1:50051,h2:50051"):
// the channel then connects to the first that answers, and when that
// connection breaks, to the first that answers again. A call in flight when it
// broke fails with Unavailable; GetRun, ReadResult and Watch (which resumes
// after the last event it yielded) are tried again, once per address. Calls
// that change something (StartRun, Cancel, SubmitDecisions) return the error:
// the sidecar may have acted on them.
func NewClient(target string, opts ...grpc.DialOption) (*Client, error) {
	addrs := Addresses(target)
	if len(addrs) == 0 {
		return nil, fmt.Errorf("carsvc: target %q names no sidecar address", target)
	}
	opts = append(channelOptions(DefaultMaxMessageBytes, ClientReconnectMaxDelay), opts...)
	if len(addrs) > 1 {
		// A resolver of this client's own that names every address; gRPC's
		// default pick_first policy connects to the first that answers.
		r := manual.NewBuilderWithScheme("carsvc-replicas")
		state := resolver.State{}
		for _, a := range addrs {
			state.Endpoints = append(state.Endpoints, resolver.Endpoint{Addresses: []resolver.Address{{Addr: a}}})
		}
		r.InitialState(state)
		target = r.Scheme() + ":///sidecar"
		opts = append(opts, grpc.WithResolvers(r))
	}
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, err
	}
	return &Client{
		Conn: conn, Runs: carv1.NewRunServiceClient(conn), Events: carv1.NewEventServiceClient(conn),
		Registry: carv1.NewRegistryServiceClient(conn), State: carv1.NewStateServiceClient(conn),
		Budgets: carv1.NewBudgetServiceClient(conn), addresses: len(addrs),
	}, nil
}

// again reports whether a read that failed with err is tried once more:
// with several addresses, an Unavailable read goes on at the next that
// answers, up to once per address (tries counts the tries so far).
func (c *Client) again(ctx context.Context, err error, tries int) bool {
	if c.addresses < 2 || status.Code(err) != codes.Unavailable || tries >= c.addresses || ctx.Err() != nil {
		return false
	}
	select { // a moment for the channel to see its connection gone
	case <-ctx.Done():
		return false
	case <-time.After(time.Duration(tries) * 50 * time.Millisecond):
		return true
	}
}

// Close closes the connection.
func (c *Client) Close() error { return c.Conn.Close() }

// RunOption sets a field of the StartRunRequest.
type RunOption func(*carv1.StartRunRequest)

func WithThreadID(id string) RunOption    { return func(r *carv1.StartRunRequest) { r.ThreadId = id } }
func WithAgentID(id string) RunOption     { return func(r *carv1.StartRunRequest) { r.AgentId = id } }
func WithRunID(id string) RunOption       { return func(r *carv1.StartRunRequest) { r.RunId = id } }
func WithOnBusy(b carv1.OnBusy) RunOption { return func(r *carv1.StartRunRequest) { r.OnBusy = b } }
func WithBudget(l *carv1.BudgetLimits) RunOption {
	return func(r *carv1.StartRunRequest) { r.Budget = l }
}
func WithBudgetID(id string) RunOption  { return func(r *carv1.StartRunRequest) { r.BudgetId = id } }
func WithStateScope(s string) RunOption { return func(r *carv1.StartRunRequest) { r.StateScope = s } }
func WithLabels(l map[string]string) RunOption {
	return func(r *carv1.StartRunRequest) { r.Labels = l }
}

// WithRunTimeout fails the run if it has not finished after d.
func WithRunTimeout(d time.Duration) RunOption {
	return func(r *carv1.StartRunRequest) { r.TimeoutMs = uint32(d.Milliseconds()) }
}

// WithInitialDecisions queues decisions before the run starts.
func WithInitialDecisions(d ...*carv1.ToolCallDecision) RunOption {
	return func(r *carv1.StartRunRequest) { r.InitialDecisions = append(r.InitialDecisions, d...) }
}

// StartRequest builds the StartRunRequest for pattern: any of the pattern
// messages (*carv1.SingleRun, *carv1.MapReduceRun, *carv1.SwarmRun, ...).
func StartRequest(pattern proto.Message, opts ...RunOption) (*carv1.StartRunRequest, error) {
	req := &carv1.StartRunRequest{}
	m := req.ProtoReflect()
	oneof := m.Descriptor().Oneofs().ByName("pattern")
	want := pattern.ProtoReflect().Descriptor().FullName()
	var field protoreflect.FieldDescriptor
	for i := 0; i < oneof.Fields().Len(); i++ {
		if f := oneof.Fields().Get(i); f.Message() != nil && f.Message().FullName() == want {
			field = f
		}
	}
	if field == nil {
		return nil, fmt.Errorf("carsvc: %s is not a run pattern", want)
	}
	m.Set(field, protoreflect.ValueOfMessage(pattern.ProtoReflect()))
	for _, opt := range opts {
		opt(req)
	}
	return req, nil
}

// StartRun starts a run of pattern and returns its handle at once.
func (c *Client) StartRun(ctx context.Context, pattern proto.Message, opts ...RunOption) (*carv1.RunHandle, error) {
	req, err := StartRequest(pattern, opts...)
	if err != nil {
		return nil, err
	}
	resp, err := c.Runs.StartRun(ctx, req)
	if err != nil {
		return nil, err
	}
	return resp.GetRun(), nil
}

// Watch yields a run's events after afterSeq (0: from the first), ending
// with run_finished. A watcher ended early may resume from the last seq seen;
// with several addresses, a watch whose sidecar went away does so by itself
// at the next (see NewClient).
//
//	for ev, err := range c.Watch(ctx, runID, 0) { ... }
func (c *Client) Watch(ctx context.Context, runID string, afterSeq uint64) iter.Seq2[*carv1.RunEvent, error] {
	return func(yield func(*carv1.RunEvent, error) bool) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		tries := 0 // since the last event
		for {
			before := afterSeq
			err := c.watchOnce(ctx, runID, &afterSeq, yield)
			if err == nil || errors.Is(err, errStopped) {
				return
			}
			if afterSeq != before {
				tries = 0
			}
			tries++
			if !c.again(ctx, err, tries) {
				yield(nil, err)
				return
			}
		}
	}
}

// errStopped: the caller stopped ranging over a watch.
var errStopped = errors.New("carsvc: the watch's caller stopped")

// watchOnce is one WatchRun stream; afterSeq follows the events yielded.
func (c *Client) watchOnce(ctx context.Context, runID string, afterSeq *uint64, yield func(*carv1.RunEvent, error) bool) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.Runs.WatchRun(ctx, &carv1.WatchRunRequest{RunId: runID, AfterSeq: *afterSeq})
	if err != nil {
		return err
	}
	for {
		batch, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		for _, ev := range batch.Events {
			*afterSeq = ev.Seq
			if !yield(ev, nil) {
				return errStopped
			}
		}
	}
}

// Wait waits until the run has finished and returns it with its whole
// result (see GetRun).
func (c *Client) Wait(ctx context.Context, runID string) (*carv1.Run, error) {
	for _, err := range c.Watch(ctx, runID, 0) {
		if err != nil {
			return nil, err
		}
	}
	return c.GetRun(ctx, runID)
}

// Run starts a run and waits for it to finish; the run comes with its whole
// result (see GetRun).
func (c *Client) Run(ctx context.Context, pattern proto.Message, opts ...RunOption) (*carv1.Run, error) {
	h, err := c.StartRun(ctx, pattern, opts...)
	if err != nil {
		return nil, err
	}
	return c.Wait(ctx, h.RunId)
}

// GetRun returns one run by id, with its whole result once it has finished:
// a result too large to travel inline (over the sidecar's
// max_inline_result_bytes, 1 MiB; the run has ResultOmitted set) is read
// with ReadResult.
func (c *Client) GetRun(ctx context.Context, runID string) (*carv1.Run, error) {
	resp, err := c.Runs.GetRun(ctx, &carv1.GetRunRequest{RunId: runID})
	for tries := 1; err != nil && c.again(ctx, err, tries); tries++ {
		resp, err = c.Runs.GetRun(ctx, &carv1.GetRunRequest{RunId: runID})
	}
	if err != nil {
		return nil, err
	}
	run := resp.GetRun()
	if run.GetResultOmitted() {
		if run.Result, err = c.ReadResult(ctx, run.RunId); err != nil {
			return nil, err
		}
	}
	return run, nil
}

// ReadResult reads a finished run's result with RunService.ReadRunResult:
// the chunks of the serialized RunResult, concatenated and parsed. This is
// how a result that GetRun, ListRuns and run_finished leave out
// (ResultOmitted, ResultBytes long) is read; it works for any finished run.
func (c *Client) ReadResult(ctx context.Context, runID string) (*carv1.RunResult, error) {
	result, err := c.readResult(ctx, runID)
	for tries := 1; err != nil && c.again(ctx, err, tries); tries++ {
		result, err = c.readResult(ctx, runID)
	}
	return result, err
}

func (c *Client) readResult(ctx context.Context, runID string) (*carv1.RunResult, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.Runs.ReadRunResult(ctx, &carv1.ReadRunResultRequest{RunId: runID})
	if err != nil {
		return nil, err
	}
	var data []byte
	var total uint64
	for {
		piece, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if piece.Offset != uint64(len(data)) {
			return nil, fmt.Errorf("carsvc: run %s: a result chunk at byte %d, expected %d", runID, piece.Offset, len(data))
		}
		if data == nil && piece.TotalBytes <= 64<<20 {
			data = make([]byte, 0, piece.TotalBytes)
		}
		data = append(data, piece.Chunk...)
		total = piece.TotalBytes
	}
	if uint64(len(data)) != total {
		return nil, fmt.Errorf("carsvc: run %s: the result stream ended after %d of %d bytes", runID, len(data), total)
	}
	result := &carv1.RunResult{}
	if err := proto.Unmarshal(data, result); err != nil {
		return nil, fmt.Errorf("carsvc: run %s: the result does not parse: %w", runID, err)
	}
	return result, nil
}

// Cancel cancels a run by id; agentID must be the run's owner. With wait the
// call returns once the run has ended. A finished run is not an error.
func (c *Client) Cancel(ctx context.Context, runID, agentID, reason string, wait bool) (*carv1.CancelRunResponse, error) {
	return c.Runs.CancelRun(ctx, &carv1.CancelRunRequest{RunId: runID, AgentId: agentID, Reason: reason, Wait: wait})
}

// SubmitDecisions answers suspended tool calls of a run (see Resume, Deny).
func (c *Client) SubmitDecisions(ctx context.Context, runID, agentID string, decisions ...*carv1.ToolCallDecision) (*carv1.SubmitDecisionsResponse, error) {
	return c.Runs.SubmitDecisions(ctx, &carv1.SubmitDecisionsRequest{RunId: runID, AgentId: agentID, Decisions: decisions})
}

// AgentOption sets a field of an inline AgentSpec.
type AgentOption func(*carv1.AgentSpec)

func Tools(names ...string) AgentOption {
	return func(s *carv1.AgentSpec) { s.Tools = append(s.Tools, names...) }
}
func SystemPrompt(p string) AgentOption { return func(s *carv1.AgentSpec) { s.SystemPrompt = p } }
func MaxTurns(n uint32) AgentOption     { return func(s *carv1.AgentSpec) { s.MaxTurns = n } }
func Metadata(m map[string]any) AgentOption {
	return func(s *carv1.AgentSpec) {
		if st, err := structpb.NewStruct(m); err == nil {
			s.Metadata = st
		}
	}
}

// Agent is an inline agent spec.
func Agent(name string, opts ...AgentOption) *carv1.AgentRef {
	spec := &carv1.AgentSpec{Name: name}
	for _, opt := range opts {
		opt(spec)
	}
	return &carv1.AgentRef{Source: &carv1.AgentRef_Spec{Spec: spec}}
}

// Registered is an agent registered with RegistryService, by name.
func Registered(name string) *carv1.AgentRef {
	return &carv1.AgentRef{Source: &carv1.AgentRef_RegisteredName{RegisteredName: name}}
}

// Single is one agent on one task.
func Single(agent *carv1.AgentRef, task string) *carv1.SingleRun {
	return &carv1.SingleRun{Agent: agent, Task: task}
}

// MapReduce runs one mapper per item, then the reducer. maxConcurrent 0
// leaves the sidecar's default (5).
func MapReduce(mapper, reducer *carv1.AgentRef, task string, items []string, maxConcurrent uint32) *carv1.MapReduceRun {
	m := &carv1.MapReduceRun{Mapper: mapper, Reducer: reducer, Task: task, Items: items}
	if maxConcurrent > 0 {
		m.MaxConcurrent = &maxConcurrent
	}
	return m
}

// Resume approves a suspended tool call; result is handed to the agent.
func Resume(targetID string, result any) (*carv1.ToolCallDecision, error) {
	d := &carv1.ToolCallDecision{TargetId: targetID, Action: carv1.DecisionAction_DECISION_ACTION_RESUME}
	if result != nil {
		v, err := ToValue(result)
		if err != nil {
			return nil, err
		}
		d.Result = v
	}
	return d, nil
}

// Deny refuses a suspended tool call.
func Deny(targetID, reason string) *carv1.ToolCallDecision {
	return &carv1.ToolCallDecision{TargetId: targetID, Action: carv1.DecisionAction_DECISION_ACTION_CANCEL, Reason: reason}
}
