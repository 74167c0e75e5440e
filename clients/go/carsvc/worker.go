package carsvc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"go.opentelemetry.io/otel/trace"

	"carsvc/clients/go/gen/carv1"
)

// SDK names this helper in the worker's hello.
const SDK = "carsvc-go/0.1.0"

// Handler runs one assignment and returns the agent's answer. ctx ends when
// the sidecar cancels the assignment (context.Cause is a *CancelledError),
// when its deadline passes, or when the session or the worker stops. An error
// becomes the output's error.
type Handler func(ctx context.Context, a *AgentContext) (string, error)

// ErrSessionEnded is returned by runtime calls made after the worker's
// session with the sidecar has ended (a reconnect does not revive them).
var ErrSessionEnded = errors.New("carsvc: the worker's session with the sidecar has ended")

// CancelledError is the cause of a handler's context when the sidecar
// cancelled the assignment.
type CancelledError struct{ Reason string }

func (e *CancelledError) Error() string { return "cancelled: " + e.Reason }

// CallError is a runtime call the sidecar refused.
type CallError struct {
	Code    codes.Code
	Message string
}

func (e *CallError) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Message) }

// RefusedError is what Run returns when the sidecar refused the worker's
// credentials: Connect ended with Unauthenticated (a missing or wrong worker
// token, or a client token) or PermissionDenied. Retrying cannot fix a
// credential, so Run does not reconnect. It wraps the gRPC status error, so
// status.Code(err) and status.FromError(err) see the status.
type RefusedError struct {
	Target string
	Code   codes.Code
	// Message is the sidecar's status message (it never contains the token).
	Message string
	Err     error
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("carsvc: the sidecar at %s refused the worker's credentials (%s: %s); check the worker token",
		e.Target, e.Code, e.Message)
}

func (e *RefusedError) Unwrap() error { return e.Err }

// refused is a *RefusedError when err is a status no reconnect can fix.
func refused(target string, err error) *RefusedError {
	st, ok := status.FromError(err)
	if err == nil || !ok || (st.Code() != codes.Unauthenticated && st.Code() != codes.PermissionDenied) {
		return nil
	}
	return &RefusedError{Target: target, Code: st.Code(), Message: st.Message(), Err: err}
}

// DefaultMaxMessageBytes is the largest message a worker or client channel
// sends or receives by default: 16 MiB, the sidecar's max_message_bytes
// (gRPC's own receive default is 4 MiB, too small for a reducer's task).
const DefaultMaxMessageBytes = 16 << 20

// UndecodableFrameError is a session that ended because a message from the
// sidecar could not be decoded (garbage bytes, or a value nested deeper than
// the protobuf parser allows). The worker reconnects after it like after any
// other lost session. It wraps the gRPC status error (codes.Internal).
type UndecodableFrameError struct {
	Cause error // the protobuf decoder's error
	Err   error // the status the stream ended with
}

func (e *UndecodableFrameError) Error() string {
	return fmt.Sprintf("carsvc: a frame from the sidecar could not be decoded: %v", e.Cause)
}

func (e *UndecodableFrameError) Unwrap() error { return e.Err }

// decodeRecorder is the proto codec, remembering the first message it could
// not decode: gRPC turns that into a bare codes.Internal status.
type decodeRecorder struct {
	encoding.CodecV2
	failed atomic.Pointer[error]
}

func newDecodeRecorder() *decodeRecorder {
	return &decodeRecorder{CodecV2: encoding.GetCodecV2("proto")}
}

func (c *decodeRecorder) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.CodecV2.Unmarshal(data, v)
	if err != nil {
		c.failed.CompareAndSwap(nil, &err)
	}
	return err
}

// wrap turns err into an *UndecodableFrameError when a decode failure ended the stream.
func (c *decodeRecorder) wrap(err error) error {
	if cause := c.failed.Load(); cause != nil && err != nil && status.Code(err) == codes.Internal {
		return &UndecodableFrameError{Cause: *cause, Err: err}
	}
	return err
}

// channelOptions are the dial options every worker and client channel
// starts with: plaintext, messages up to maxBytes both ways, and gRPC's
// reconnect backoff capped at maxBackoff (its own default grows to 120 s).
func channelOptions(maxBytes int, maxBackoff time.Duration) []grpc.DialOption {
	if maxBytes <= 0 {
		maxBytes = DefaultMaxMessageBytes
	}
	b := backoff.DefaultConfig
	b.BaseDelay = min(100*time.Millisecond, maxBackoff)
	b.MaxDelay = maxBackoff
	return []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		MaxMessageBytes(maxBytes),
		// MinConnectTimeout: gRPC's default (a zero value would mean no time at all).
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: b, MinConnectTimeout: 20 * time.Second}),
	}
}

// MaxMessageBytes is a dial option setting the largest message a channel
// sends and receives (default DefaultMaxMessageBytes):
// carsvc.NewClient(target, carsvc.MaxMessageBytes(32<<20)).
func MaxMessageBytes(n int) grpc.DialOption {
	return grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(n), grpc.MaxCallSendMsgSize(n))
}

// Addresses splits a target into its sidecar addresses: one "host:port", or
// several separated by commas ("h1:50051,h2:50051", as CARSVC_TARGET may hold
// them). Spaces around an address and empty entries are dropped.
func Addresses(target string) []string {
	var out []string
	for _, a := range strings.Split(target, ",") {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	return out
}

// Worker is one worker process's connection to the sidecar. Set the exported
// fields before Run; NewWorker fills in the defaults.
type Worker struct {
	// Target is the sidecar's "host:port", or several replicas' addresses
	// separated by commas. Each connection attempt goes to the next address
	// in turn, starting with the first: a worker whose replica died or
	// drained it reconnects to another.
	Target      string
	WorkerID    string            // default host-pid
	MaxInFlight int               // assignments held at once; default 1
	Labels      map[string]string // shown in RegistryService.ListWorkers
	// Reconnect after the stream ends (the sidecar crashed, or drained this
	// worker because it is restarting, or sent a frame the worker could not
	// decode), with backoff from 100 ms up to ReconnectMaxDelay, one backoff
	// across all addresses. Every attempt uses a fresh connection, so gRPC's
	// own reconnect backoff never delays it.
	Reconnect         bool
	ReconnectMaxDelay time.Duration
	// MaxMessageBytes is the largest message the worker sends or receives
	// (default DefaultMaxMessageBytes, 16 MiB, the sidecar's own limit).
	MaxMessageBytes int
	// StopOnDrain makes Run return after the sidecar drained the worker and
	// its held work is done, instead of reconnecting.
	StopOnDrain bool
	// Token is a worker token, sent as "authorization: Bearer <token>"
	// metadata on the Connect stream; empty sends none. A refused token ends
	// Run with a *RefusedError.
	Token       string
	Logger      *slog.Logger
	DialOptions []grpc.DialOption
	// OnConnect, when set, is called with the session id after every welcome.
	OnConnect func(sessionID string)
	// TracerProvider makes each agent's span ("invoke_agent {name}", a child
	// of the sidecar's span of the step); nil uses OpenTelemetry's global
	// provider, a no-op unless the program set one up (docs/operations.md, "Traces").
	TracerProvider trace.TracerProvider

	mu       sync.Mutex
	handlers map[string]Handler
	order    []string
}

// NewWorker returns a worker for the sidecar at target ("host:port", or
// several addresses separated by commas).
func NewWorker(target string) *Worker {
	host, _ := os.Hostname()
	return &Worker{
		Target:            target,
		WorkerID:          fmt.Sprintf("%s-%d", host, os.Getpid()),
		MaxInFlight:       1,
		Reconnect:         true,
		ReconnectMaxDelay: 5 * time.Second,
		MaxMessageBytes:   DefaultMaxMessageBytes,
		Logger:            slog.Default(),
		handlers:          map[string]Handler{},
	}
}

// Handle serves agent name (an exact name or a glob such as "mapper*") with h.
func (w *Worker) Handle(name string, h Handler) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.handlers == nil {
		w.handlers = map[string]Handler{}
	}
	if _, ok := w.handlers[name]; !ok {
		w.order = append(w.order, name)
	}
	w.handlers[name] = h
}

// handlerFor picks the handler by Assignment.agent: an exact name first, then
// the first glob that matches.
func (w *Worker) handlerFor(agent string) Handler {
	w.mu.Lock()
	defer w.mu.Unlock()
	if h, ok := w.handlers[agent]; ok {
		return h
	}
	for _, pattern := range w.order {
		if ok, _ := path.Match(pattern, agent); ok {
			return w.handlers[pattern]
		}
	}
	return nil
}

// Run serves until ctx ends (then it returns nil), or the session ends and
// Reconnect is off (the error; nil after a drain). On a Drain, held work is
// finished and its results sent, then the stream is closed; Run then
// reconnects, or returns nil with StopOnDrain. When the sidecar refuses the
// worker's credentials, Run returns a *RefusedError at once, whatever
// Reconnect says.
func (w *Worker) Run(ctx context.Context) error {
	w.mu.Lock()
	n := len(w.order)
	w.mu.Unlock()
	if n == 0 {
		return errors.New("carsvc: register at least one agent with Handle before Run")
	}
	if w.Token != "" && !validToken(w.Token) {
		return errors.New("carsvc: Worker.Token is not a valid token: tokens are printable ASCII without spaces")
	}
	targets := Addresses(w.Target)
	if len(targets) == 0 {
		return fmt.Errorf("carsvc: Worker.Target %q names no sidecar address", w.Target)
	}
	maxDelay := w.ReconnectMaxDelay
	if maxDelay <= 0 {
		maxDelay = 5 * time.Second
	}
	delay := min(100*time.Millisecond, maxDelay)
	attempt := 0 // reconnect attempts since the last session that lasted
	for turn := 0; ; turn++ {
		// Every attempt goes to the next address: a replica that died or
		// drained this worker is tried again only after the others.
		target := targets[turn%len(targets)]
		var connectedAt time.Time
		drained, err := w.session(ctx, target, maxDelay, &connectedAt)
		if ctx.Err() != nil {
			return nil
		}
		if r := refused(target, err); r != nil {
			w.Logger.Error("carsvc worker: the sidecar refused the worker's credentials; not reconnecting",
				"worker", w.WorkerID, "target", target, "code", r.Code, "message", r.Message)
			return r
		}
		if drained && (w.StopOnDrain || !w.Reconnect) {
			return nil
		}
		var undecodable *UndecodableFrameError
		if !w.Reconnect {
			if errors.As(err, &undecodable) {
				w.Logger.Error("carsvc worker: a frame from the sidecar could not be decoded; not reconnecting (Reconnect is off)",
					"worker", w.WorkerID, "target", target, "err", undecodable.Cause)
			}
			return err
		}
		if !connectedAt.IsZero() && time.Since(connectedAt) > 10*time.Second {
			delay, attempt = min(100*time.Millisecond, maxDelay), 0
		}
		attempt++
		switch {
		case drained:
			w.Logger.Info("carsvc worker: drained; reconnecting", "worker", w.WorkerID, "target", target,
				"in", delay, "attempt", attempt)
		case errors.As(err, &undecodable):
			w.Logger.Error("carsvc worker: a frame from the sidecar could not be decoded; the session is lost, reconnecting",
				"worker", w.WorkerID, "target", target, "err", undecodable.Cause, "in", delay, "attempt", attempt)
		default:
			w.Logger.Warn("carsvc worker: session ended; reconnecting", "worker", w.WorkerID, "target", target,
				"err", err, "in", delay, "attempt", attempt)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay):
		}
		delay = min(delay*2, maxDelay)
	}
}

// validToken: a token travels as metadata, so it is printable ASCII without spaces.
func validToken(token string) bool {
	for _, c := range token {
		if c <= ' ' || c > '~' {
			return false
		}
	}
	return token != ""
}

// session is one connection; it reports whether the sidecar drained us.
// Every session dials a fresh connection: a connection kept across attempts
// would wait out gRPC's own reconnect backoff (up to 120 s) instead of ours.
// connectedAt is set when the sidecar welcomes the worker.
func (w *Worker) session(parent context.Context, target string, maxBackoff time.Duration, connectedAt *time.Time) (bool, error) {
	codec := newDecodeRecorder()
	opts := append(channelOptions(w.MaxMessageBytes, maxBackoff), grpc.WithDefaultCallOptions(grpc.ForceCodecV2(codec)))
	conn, err := grpc.NewClient(target, append(opts, w.DialOptions...)...)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	drained, err := w.serve(parent, conn, target, connectedAt)
	return drained, codec.wrap(err)
}

func (w *Worker) serve(parent context.Context, conn *grpc.ClientConn, target string, connectedAt *time.Time) (bool, error) {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	callCtx := ctx
	if w.Token != "" {
		callCtx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+w.Token)
	}
	stream, err := carv1.NewWorkerServiceClient(conn).Connect(callCtx)
	if err != nil {
		return false, err
	}
	agents := func() []string { w.mu.Lock(); defer w.mu.Unlock(); return append([]string(nil), w.order...) }()
	hello := &carv1.WorkerHello{
		WorkerId: w.WorkerID, Agents: agents, MaxInFlight: uint32(max(w.MaxInFlight, 1)), Labels: w.Labels, Sdk: SDK,
	}
	if err := stream.Send(&carv1.ConnectRequest{Hello: hello}); err != nil {
		return false, recvErr(stream, err)
	}
	first, err := stream.Recv()
	if err != nil {
		return false, err
	}
	s := &session{
		w: w, ctx: ctx, stream: stream, wake: make(chan struct{}, 1), done: make(chan struct{}),
		pending: map[string]chan *carv1.CallResult{}, running: map[string]context.CancelCauseFunc{},
		heartbeat: 2500 * time.Millisecond,
	}
	if wel := first.GetWelcome(); wel != nil && wel.HeartbeatIntervalMs > 0 {
		// Send well within the interval so one slow frame never lapses the lease.
		s.heartbeat = time.Duration(wel.HeartbeatIntervalMs) * time.Millisecond / 2
	}
	*connectedAt = time.Now()
	w.Logger.Info("carsvc worker: connected", "worker", w.WorkerID, "target", target,
		"session", first.GetWelcome().GetSessionId(), "agents", strings.Join(agents, ","))
	if w.OnConnect != nil {
		w.OnConnect(first.GetWelcome().GetSessionId())
	}
	sent := make(chan error, 1)
	go func() { sent <- s.sendLoop() }()
	drained, err := s.readLoop(first)
	s.end()
	cancel()
	waited := make(chan struct{})
	go func() { s.handlers.Wait(); close(waited) }()
	select { // handlers that ignore their context are left behind after a second
	case <-waited:
	case <-time.After(time.Second):
	}
	if sendErr := <-sent; err == nil && sendErr != nil && !drained {
		err = sendErr
	}
	return drained, err
}

func recvErr(stream carv1.WorkerService_ConnectClient, err error) error {
	if errors.Is(err, io.EOF) { // the real error comes from Recv
		if _, rerr := stream.Recv(); rerr != nil {
			return rerr
		}
	}
	return err
}

// session is one connected stream: its outbox, calls in flight and handlers.
type session struct {
	w         *Worker
	ctx       context.Context
	stream    carv1.WorkerService_ConnectClient
	heartbeat time.Duration
	wake      chan struct{}
	done      chan struct{}
	handlers  sync.WaitGroup

	mu       sync.Mutex
	results  []*carv1.AssignmentResult
	calls    []*carv1.RuntimeCall
	closed   bool // no more frames after the ones queued: close the send side
	ended    bool
	draining bool
	nextID   uint64
	pending  map[string]chan *carv1.CallResult
	running  map[string]context.CancelCauseFunc
}

func (s *session) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// sendLoop is the only goroutine that sends: it batches everything queued
// into one frame, and sends a heartbeat after half an interval of silence.
func (s *session) sendLoop() error {
	for {
		timedOut := false
		select {
		case <-s.wake:
		case <-time.After(s.heartbeat):
			timedOut = true
		case <-s.done:
			return nil
		}
		s.mu.Lock()
		frame := &carv1.ConnectRequest{Results: s.results, Calls: s.calls}
		s.results, s.calls = nil, nil
		closed := s.closed
		s.mu.Unlock()
		if len(frame.Results) == 0 && len(frame.Calls) == 0 {
			frame = nil
			if timedOut {
				frame = &carv1.ConnectRequest{Heartbeat: &carv1.Heartbeat{}}
			}
		}
		if frame != nil {
			if err := s.stream.Send(frame); err != nil {
				return err
			}
		}
		if closed {
			return s.stream.CloseSend()
		}
	}
}

func (s *session) readLoop(frame *carv1.ConnectResponse) (bool, error) {
	for {
		for _, a := range frame.Assignments {
			s.start(a)
		}
		for _, c := range frame.Cancels {
			s.mu.Lock()
			cancel := s.running[c.AssignmentId]
			s.mu.Unlock()
			if cancel != nil {
				cancel(&CancelledError{Reason: c.Reason})
			}
		}
		for _, r := range frame.CallResults {
			s.mu.Lock()
			ch := s.pending[r.CallId]
			delete(s.pending, r.CallId)
			s.mu.Unlock()
			if ch != nil {
				ch <- r
			}
		}
		for _, e := range frame.Errors {
			s.w.Logger.Warn("carsvc worker: the sidecar refused part of a frame",
				"worker", s.w.WorkerID, "field", e.Field, "code", codes.Code(e.Code), "message", e.Message)
		}
		if frame.Drain != nil {
			s.w.Logger.Info("carsvc worker: draining", "worker", s.w.WorkerID, "reason", frame.Drain.Reason)
			s.mu.Lock()
			s.draining = true
			if len(s.running) == 0 {
				s.closed = true
			}
			s.mu.Unlock()
			s.poke()
		}
		next, err := s.stream.Recv()
		if err != nil {
			s.mu.Lock()
			drained := s.draining
			s.mu.Unlock()
			if errors.Is(err, io.EOF) {
				if drained {
					return true, nil
				}
				return false, status.Error(codes.Unavailable, "the sidecar ended the session")
			}
			return drained, err // after a drain the stream's end is expected
		}
		frame = next
	}
}

// end fails calls in flight and stops every handler of this session.
func (s *session) end() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended {
		return
	}
	s.ended, s.closed = true, true
	close(s.done)
	for _, cancel := range s.running {
		cancel(ErrSessionEnded)
	}
}

func (s *session) start(a *carv1.Assignment) {
	ctx, cancel := context.WithCancelCause(s.ctx)
	s.mu.Lock()
	s.running[a.AssignmentId] = cancel
	s.mu.Unlock()
	s.handlers.Add(1)
	go func() {
		defer s.handlers.Done()
		defer cancel(nil)
		runCtx := ctx
		if a.DeadlineUnixMs > 0 {
			var stop context.CancelFunc
			runCtx, stop = context.WithDeadline(ctx, time.UnixMilli(a.DeadlineUnixMs))
			defer stop()
		}
		s.finish(a, s.execute(runCtx, a))
	}()
}

func (s *session) execute(ctx context.Context, a *carv1.Assignment) (out *carv1.AgentOutput) {
	agent := newAgentContext(s, a)
	started := time.Now()
	out = &carv1.AgentOutput{Name: agent.Name}
	ctx, span := s.w.startAgentSpan(ctx, a, agent.Name)
	defer func() { endAgentSpan(span, out) }() // runs last, with the output complete
	defer func() {
		if p := recover(); p != nil {
			s.w.Logger.Error("carsvc worker: handler panicked", "agent", agent.AgentName, "panic", p, "stack", string(debug.Stack()))
			out.Error = ptr(fmt.Sprintf("panic: %v", p))
		}
		out.DurationMs = float64(time.Since(started).Microseconds()) / 1000
		if out.Error != nil && ctx.Err() != nil {
			if c := (*CancelledError)(nil); errors.As(context.Cause(ctx), &c) {
				out.Error = ptr(c.Error())
			}
		}
	}()
	h := s.w.handlerFor(agent.AgentName)
	if h == nil {
		out.Error = ptr(fmt.Sprintf("this worker has no handler for agent '%s'", agent.AgentName))
		return out
	}
	answer, err := h(ctx, agent)
	switch {
	case err != nil:
		out.Error = ptr(err.Error())
	case ctx.Err() != nil:
		out.Error = ptr(context.Cause(ctx).Error())
	default:
		out.Answer = answer
		out.Turns = 1
	}
	agent.mu.Lock()
	defer agent.mu.Unlock()
	out.Tokens = agent.usage
	out.ToolCalls = agent.toolCalls
	out.ToolsUsed = agent.toolsUsed
	return out
}

func (s *session) finish(a *carv1.Assignment, out *carv1.AgentOutput) {
	s.mu.Lock()
	delete(s.running, a.AssignmentId)
	if !s.closed {
		// Echo both the id and the attempt: a result for a superseded attempt is ignored.
		s.results = append(s.results, &carv1.AssignmentResult{AssignmentId: a.AssignmentId, Attempt: a.Attempt, Output: out})
		if s.draining && len(s.running) == 0 {
			s.closed = true
		}
	}
	s.mu.Unlock()
	s.poke()
}

// call sends a runtime call with a call id and waits for its result.
func (s *session) call(ctx context.Context, c *carv1.RuntimeCall) (*carv1.CallResult, error) {
	ch := make(chan *carv1.CallResult, 1)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrSessionEnded
	}
	s.nextID++
	c.CallId = strconv.FormatUint(s.nextID, 10)
	s.pending[c.CallId] = ch
	s.calls = append(s.calls, c)
	s.mu.Unlock()
	s.poke()
	select {
	case r := <-ch:
		if e := r.GetError(); e != nil {
			return nil, &CallError{Code: codes.Code(e.Code), Message: e.Message}
		}
		return r, nil
	case <-ctx.Done():
		s.mu.Lock()
		delete(s.pending, c.CallId)
		s.mu.Unlock()
		return nil, context.Cause(ctx)
	case <-s.done:
		return nil, ErrSessionEnded
	}
}

// fire queues a call without a call id (fire and forget).
func (s *session) fire(c *carv1.RuntimeCall) {
	s.mu.Lock()
	if !s.closed {
		s.calls = append(s.calls, c)
	}
	s.mu.Unlock()
	s.poke()
}

func ptr[T any](v T) *T { return &v }
