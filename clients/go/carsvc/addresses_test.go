package carsvc

// Several sidecar addresses: the worker tries them in turn, one attempt each,
// with one backoff; the client connects to the first that answers and a watch
// whose replica went away resumes at the next after the last event it yielded.

import (
	"context"
	"net"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"carsvc/clients/go/gen/carv1"
)

// deadAddress is a loopback address nothing listens on.
func deadAddress(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	return addr
}

// welcomeAndWait welcomes the worker and holds the session until it ends.
func welcomeAndWait(n int, stream connectStream) error {
	if err := stream.Send(welcome(n)); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

func TestAddresses(t *testing.T) {
	for target, want := range map[string][]string{
		"h1:1":           {"h1:1"},
		"h1:1,h2:2":      {"h1:1", "h2:2"},
		" h1:1 , h2:2, ": {"h1:1", "h2:2"},
		" , ":            nil,
	} {
		if got := Addresses(target); !reflect.DeepEqual(got, want) {
			t.Errorf("Addresses(%q) = %q, want %q", target, got, want)
		}
	}
	if err := NewWorker(" , ").Run(context.Background()); err == nil {
		t.Error("Run with no address returned nil")
	}
}

func TestTheWorkerConnectsToTheFirstAddressThatAnswers(t *testing.T) {
	dead := deadAddress(t)
	fake, live := startFake(t, welcomeAndWait)
	logs := &syncBuffer{}
	w := testWorker(dead+","+live, logs)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	connected := false
	w.OnConnect = func(string) { connected = true; cancel() }
	if err := w.Run(ctx); err != nil || !connected {
		t.Fatalf("Run returned %v, connected %v", err, connected)
	}
	if fake.count() != 1 {
		t.Errorf("%d Connects to the live address, want 1", fake.count())
	}
	for _, want := range []string{
		"level=WARN msg=\"carsvc worker: session ended; reconnecting\" worker=test-worker target=" + dead,
		"level=INFO msg=\"carsvc worker: connected\" worker=test-worker target=" + live + " session=s1 agents=a",
	} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log lacks %q:\n%s", want, logs)
		}
	}
}

func TestTheWorkerMovesToTheNextAddressWhenItsSessionEnds(t *testing.T) {
	// A and B drain the worker at once: it goes A, B, A, B ... one attempt each.
	var mu sync.Mutex
	var order []string
	record := func(name string) func(int, connectStream) error {
		return func(n int, stream connectStream) error {
			mu.Lock()
			order = append(order, name)
			mu.Unlock()
			return drainAtOnce(n, stream)
		}
	}
	_, a := startFake(t, record("a"))
	_, b := startFake(t, record("b"))
	w := testWorker(a+","+b, &syncBuffer{})
	w.ReconnectMaxDelay = 20 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	connects := 0
	w.OnConnect = func(string) {
		if connects++; connects == 4 {
			cancel()
		}
	}
	if err := w.Run(ctx); err != nil {
		t.Fatalf("Run: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"a", "b", "a", "b"}; !reflect.DeepEqual(order, want) {
		t.Errorf("sessions at %v, want %v", order, want)
	}
}

// replica is a RunService whose WatchRun sends the events given for it after
// the request's after_seq and then, with dies, stops the whole server (its
// connections break, its port refuses). It records the after_seq it was asked for.
type replica struct {
	srv    *grpc.Server
	addr   string
	events []uint64
	dies   bool

	mu    sync.Mutex
	after []uint64
}

func startReplica(t *testing.T, events []uint64, dies bool) *replica {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &replica{addr: lis.Addr().String(), events: events, dies: dies}
	r.srv = grpc.NewServer(append(serverOptions(), grpc.UnknownServiceHandler(r.handle))...)
	go func() { _ = r.srv.Serve(lis) }()
	t.Cleanup(r.srv.Stop)
	return r
}

func (r *replica) handle(_ any, stream grpc.ServerStream) error {
	req := &carv1.WatchRunRequest{}
	if err := stream.RecvMsg(req); err != nil {
		return err
	}
	r.mu.Lock()
	r.after = append(r.after, req.AfterSeq)
	r.mu.Unlock()
	for _, seq := range r.events {
		if seq <= req.AfterSeq {
			continue
		}
		ev := &carv1.RunEvent{Seq: seq, RunId: req.RunId}
		if seq == r.events[len(r.events)-1] && !r.dies {
			ev.Kind = &carv1.RunEvent_RunFinished{RunFinished: &carv1.RunFinished{}}
		}
		if err := stream.SendMsg(&carv1.WatchRunResponse{Events: []*carv1.RunEvent{ev}}); err != nil {
			return err
		}
	}
	if r.dies {
		time.Sleep(50 * time.Millisecond) // the events reach the client first
		go r.srv.Stop()
		<-stream.Context().Done()
	}
	return nil
}

func (r *replica) asked() []uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]uint64(nil), r.after...)
}

func TestAWatchResumesAtTheNextAddressAfterItsReplicaDied(t *testing.T) {
	a := startReplica(t, []uint64{1, 2}, true)
	b := startReplica(t, []uint64{1, 2, 3}, false)
	c, err := NewClient(a.addr + "," + b.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var seqs []uint64
	for ev, err := range c.Watch(ctx, "r1", 0) {
		if err != nil {
			t.Fatalf("Watch: %v (after %v)", err, seqs)
		}
		seqs = append(seqs, ev.Seq)
	}
	if want := []uint64{1, 2, 3}; !reflect.DeepEqual(seqs, want) {
		t.Errorf("events %v, want %v", seqs, want)
	}
	if got := a.asked(); !reflect.DeepEqual(got, []uint64{0}) {
		t.Errorf("replica A was asked after %v, want [0]", got)
	}
	if got := b.asked(); !reflect.DeepEqual(got, []uint64{2}) {
		t.Errorf("replica B was asked after %v, want [2]: the watch resumes after the last event", got)
	}
}

func TestAClientGivenADeadAddressFirstCallsTheLiveOne(t *testing.T) {
	b := startReplica(t, []uint64{1}, false)
	c, err := NewClient(deadAddress(t) + ", " + b.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for ev, err := range c.Watch(ctx, "r1", 0) {
		if err != nil {
			t.Fatalf("Watch: %v", err)
		}
		if ev.GetRunFinished() == nil {
			t.Errorf("event %v, want run_finished", ev)
		}
	}
	if got := b.asked(); !reflect.DeepEqual(got, []uint64{0}) {
		t.Errorf("the live replica was asked %v, want one watch", got)
	}
}
