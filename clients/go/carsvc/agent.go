package carsvc

import (
	"context"
	"sync"
	"time"

	"carsvc/clients/go/gen/carv1"
)

// AgentContext is one assignment as its handler sees it, with the runtime
// calls an agent makes back into the sidecar. Calls that wait for an answer
// take a context; Emit and Progress are fire and forget.
type AgentContext struct {
	Assignment   *carv1.Assignment
	AssignmentID string
	Attempt      uint32
	RunID        string
	ThreadID     string
	// AgentName is the name the worker was matched on (Assignment.agent);
	// Name is the instance name a pattern may have chosen (mapper i runs as
	// "{mapper}_{i}").
	AgentName string
	Name      string
	Task      string
	Spec      *carv1.AgentSpec

	s         *session
	mu        sync.Mutex
	usage     *carv1.TokenAccounting
	toolCalls uint32
	toolsUsed []string
}

func newAgentContext(s *session, a *carv1.Assignment) *AgentContext {
	agent := a.Agent
	if agent == "" {
		agent = a.GetSpec().GetName()
	}
	return &AgentContext{
		Assignment: a, AssignmentID: a.AssignmentId, Attempt: a.Attempt, RunID: a.RunId, ThreadID: a.ThreadId,
		AgentName: agent, Name: a.GetSpec().GetName(), Task: a.Task, Spec: a.GetSpec(), s: s,
	}
}

// ReportUsage adds self-reported token and cost spend to the agent's output
// (the run's budget adds it up).
func (a *AgentContext) ReportUsage(inputTokens, outputTokens uint64, costUSD float64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.usage == nil {
		a.usage = &carv1.TokenAccounting{}
	}
	a.usage.InputTokens += inputTokens
	a.usage.OutputTokens += outputTokens
	a.usage.CostUsd += costUSD
}

func (a *AgentContext) usedTool(name string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.toolCalls++
	for _, t := range a.toolsUsed {
		if t == name {
			return
		}
	}
	a.toolsUsed = append(a.toolsUsed, name)
}

// Call makes any runtime call and waits for its result; a refusal is a *CallError.
func (a *AgentContext) Call(ctx context.Context, call *carv1.RuntimeCall) (*carv1.CallResult, error) {
	call.AssignmentId = a.AssignmentID
	return a.s.call(ctx, call)
}

func (a *AgentContext) fire(call *carv1.RuntimeCall) {
	call.AssignmentId = a.AssignmentID
	a.s.fire(call)
}

// StateGet reads a key of the run's state (the agent's overlay when isolated).
func (a *AgentContext) StateGet(ctx context.Context, key string) (value any, found bool, err error) {
	r, err := a.Call(ctx, &carv1.RuntimeCall{Op: &carv1.RuntimeCall_StateGet{StateGet: &carv1.StateGetCall{Key: key}}})
	if err != nil {
		return nil, false, err
	}
	return FromValue(r.GetStateGet().GetValue()), r.GetStateGet().GetFound(), nil
}

// StateSet writes a key and returns the transition index.
func (a *AgentContext) StateSet(ctx context.Context, key string, value any) (uint64, error) {
	v, err := ToValue(value)
	if err != nil {
		return 0, err
	}
	r, err := a.Call(ctx, &carv1.RuntimeCall{Op: &carv1.RuntimeCall_StateSet{StateSet: &carv1.StateSetCall{Key: key, Value: v}}})
	if err != nil {
		return 0, err
	}
	return r.GetStateWrite().GetIndex(), nil
}

// StateDelete deletes a key and reports whether it existed.
func (a *AgentContext) StateDelete(ctx context.Context, key string) (bool, error) {
	r, err := a.Call(ctx, &carv1.RuntimeCall{Op: &carv1.RuntimeCall_StateDelete{StateDelete: &carv1.StateDeleteCall{Key: key}}})
	if err != nil {
		return false, err
	}
	return r.GetStateWrite().GetExisted(), nil
}

// StateKeys lists the keys starting with prefix, sorted.
func (a *AgentContext) StateKeys(ctx context.Context, prefix string) ([]string, error) {
	r, err := a.Call(ctx, &carv1.RuntimeCall{Op: &carv1.RuntimeCall_StateKeys{StateKeys: &carv1.StateKeysCall{Prefix: prefix}}})
	if err != nil {
		return nil, err
	}
	return r.GetStateKeys().GetKeys(), nil
}

// Send sends payload to another agent of the run.
func (a *AgentContext) Send(ctx context.Context, to string, payload any) error {
	return a.send(ctx, &carv1.Message{ToAgent: to, Kind: carv1.MessageKind_MESSAGE_KIND_CUSTOM}, payload, false)
}

// Broadcast sends payload to every other agent of the run.
func (a *AgentContext) Broadcast(ctx context.Context, payload any) error {
	return a.send(ctx, &carv1.Message{Kind: carv1.MessageKind_MESSAGE_KIND_CUSTOM}, payload, true)
}

func (a *AgentContext) send(ctx context.Context, m *carv1.Message, payload any, broadcast bool) error {
	v, err := ToValue(payload)
	if err != nil {
		return err
	}
	m.Payload = v
	_, err = a.Call(ctx, &carv1.RuntimeCall{Op: &carv1.RuntimeCall_MailboxSend{
		MailboxSend: &carv1.MailboxSendCall{Message: m, Broadcast: broadcast}}})
	return err
}

// Recv waits for the next message to this agent; timeout 0 means the
// sidecar's default. A timeout is a *CallError with codes.DeadlineExceeded.
func (a *AgentContext) Recv(ctx context.Context, timeout time.Duration) (*carv1.Message, error) {
	r, err := a.Call(ctx, &carv1.RuntimeCall{Op: &carv1.RuntimeCall_MailboxRecv{
		MailboxRecv: &carv1.MailboxRecvCall{TimeoutMs: uint32(timeout.Milliseconds())}}})
	if err != nil {
		return nil, err
	}
	return r.GetMessage(), nil
}

// Emit appends a custom event to the run's stream (fire and forget; a
// failure comes back as a FrameError, which the worker logs).
func (a *AgentContext) Emit(kind string, payload any) error {
	call := &carv1.EmitEventCall{Kind: kind}
	if payload != nil {
		v, err := ToValue(payload)
		if err != nil {
			return err
		}
		call.Payload = v
	}
	a.fire(&carv1.RuntimeCall{Op: &carv1.RuntimeCall_Emit{Emit: call}})
	return nil
}

// Progress reports progress to the run's watchers (fire and forget).
func (a *AgentContext) Progress(message string) {
	a.fire(&carv1.RuntimeCall{Op: &carv1.RuntimeCall_Progress{Progress: &carv1.ProgressCall{Message: message}}})
}

// ProgressFraction reports progress with a fraction in 0..1.
func (a *AgentContext) ProgressFraction(message string, fraction float64) {
	a.fire(&carv1.RuntimeCall{Op: &carv1.RuntimeCall_Progress{
		Progress: &carv1.ProgressCall{Message: message, Fraction: &fraction}}})
}

// Decision is a client's answer to a suspended tool call.
type Decision struct {
	Approved   bool // resume (true) or cancel (false)
	Result     any  // the value a resume carries
	Reason     string
	DecisionID string
}

// SuspendOptions tune SuspendToolCall.
type SuspendOptions struct {
	Reason  string
	Timeout time.Duration // 0: the sidecar's suspension_timeout_s
}

// SuspendToolCall suspends a tool call until a client approves or denies it
// (human in the loop). The tool must be in the agent's spec. The run is
// WAITING meanwhile.
func (a *AgentContext) SuspendToolCall(ctx context.Context, toolCallID, toolName string, arguments any, opts SuspendOptions) (*Decision, error) {
	call := &carv1.SuspendToolCall{
		ToolCallId: toolCallID, ToolName: toolName, Reason: opts.Reason, TimeoutMs: uint32(opts.Timeout.Milliseconds()),
	}
	if arguments != nil {
		v, err := ToValue(arguments)
		if err != nil {
			return nil, err
		}
		call.Arguments = v
	}
	a.usedTool(toolName)
	r, err := a.Call(ctx, &carv1.RuntimeCall{Op: &carv1.RuntimeCall_SuspendToolCall{SuspendToolCall: call}})
	if err != nil {
		return nil, err
	}
	d := r.GetDecision()
	return &Decision{
		Approved: d.GetAction() == carv1.DecisionAction_DECISION_ACTION_RESUME, Result: FromValue(d.GetResult()),
		Reason: d.GetReason(), DecisionID: d.GetDecisionId(),
	}, nil
}

// Delegate hands subtask to a named specialist (delegator pattern) and
// returns its output.
func (a *AgentContext) Delegate(ctx context.Context, specialist, subtask string) (*carv1.AgentOutput, error) {
	a.usedTool("delegate")
	r, err := a.Call(ctx, &carv1.RuntimeCall{Op: &carv1.RuntimeCall_Delegate{
		Delegate: &carv1.DelegateCall{Specialist: specialist, Subtask: subtask}}})
	if err != nil {
		return nil, err
	}
	return r.GetAgentOutput(), nil
}

// SpawnSubtask spawns an ephemeral sub-agent with a subset of this agent's
// tools (spawn_subtask pattern) and returns its output.
func (a *AgentContext) SpawnSubtask(ctx context.Context, task string, tools []string, name string) (*carv1.AgentOutput, error) {
	a.usedTool("spawn_subtask")
	r, err := a.Call(ctx, &carv1.RuntimeCall{Op: &carv1.RuntimeCall_SpawnSubtask{
		SpawnSubtask: &carv1.SpawnSubtaskCall{Task: task, Tools: tools, Name: name}}})
	if err != nil {
		return nil, err
	}
	return r.GetAgentOutput(), nil
}

// ConsultAdvisor asks the run's advisor (advisor pattern) for a verdict.
func (a *AgentContext) ConsultAdvisor(ctx context.Context, prompt string) (*carv1.AdvisorConsultation, error) {
	a.usedTool("consult_advisor")
	r, err := a.Call(ctx, &carv1.RuntimeCall{Op: &carv1.RuntimeCall_ConsultAdvisor{
		ConsultAdvisor: &carv1.ConsultAdvisorCall{Prompt: prompt}}})
	if err != nil {
		return nil, err
	}
	return r.GetConsultation(), nil
}
