package carsvc

// ReadResult and GetRun against a fake RunService: a result left out of
// GetRun is read in chunks; chunks out of place or a short stream are errors.

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"carsvc/clients/go/gen/carv1"
)

// chunked splits a RunResult's serialization into ReadRunResultResponses of n bytes.
func chunked(t *testing.T, result *carv1.RunResult, n int) []*carv1.ReadRunResultResponse {
	t.Helper()
	data, err := proto.Marshal(result)
	if err != nil {
		t.Fatal(err)
	}
	var out []*carv1.ReadRunResultResponse
	for off := 0; off < len(data); off += n {
		end := min(off+n, len(data))
		out = append(out, &carv1.ReadRunResultResponse{Chunk: data[off:end], Offset: uint64(off), TotalBytes: uint64(len(data))})
	}
	return out
}

func TestGetRunReadsAnOmittedResultInChunks(t *testing.T) {
	answer := strings.Repeat("z", 3<<20)
	result := &carv1.RunResult{Result: &carv1.RunResult_Single{Single: &carv1.SingleResult{Output: &carv1.AgentOutput{Answer: answer}}}}
	pieces := chunked(t, result, 1<<20)
	if len(pieces) != 4 {
		t.Fatalf("%d chunks, want 4", len(pieces))
	}
	size := pieces[0].TotalBytes
	addr := runServer(t, func(method string) []rawFrame {
		switch method {
		case "/car.v1.RunService/GetRun":
			return []rawFrame{marshal(t, &carv1.GetRunResponse{Run: &carv1.Run{RunId: "r1", ResultOmitted: true, ResultBytes: size}})}
		case "/car.v1.RunService/ReadRunResult":
			var frames []rawFrame
			for _, p := range pieces {
				frames = append(frames, marshal(t, p))
			}
			return frames
		}
		t.Errorf("unexpected call %s", method)
		return nil
	})
	c, err := NewClient(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	run, err := c.GetRun(ctx, "r1")
	if err != nil {
		t.Fatalf("GetRun: %v", err)
	}
	if got := run.GetResult().GetSingle().GetOutput().GetAnswer(); got != answer {
		t.Errorf("answer of %d bytes, want %d", len(got), len(answer))
	}
	if !run.ResultOmitted || run.ResultBytes != size {
		t.Errorf("ResultOmitted %v, ResultBytes %d: want the sidecar's true, %d", run.ResultOmitted, run.ResultBytes, size)
	}
}

func TestReadResultRefusesAGapOrAShortStream(t *testing.T) {
	result := &carv1.RunResult{Result: &carv1.RunResult_Single{Single: &carv1.SingleResult{Output: &carv1.AgentOutput{Answer: strings.Repeat("q", 4000)}}}}
	pieces := chunked(t, result, 1000)
	cases := map[string]struct {
		frames []*carv1.ReadRunResultResponse
		want   string
	}{
		"a chunk missing": {append([]*carv1.ReadRunResultResponse{pieces[0]}, pieces[2:]...), "a result chunk at byte 2000, expected 1000"},
		"a short stream":  {pieces[:3], "ended after 3000 of"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			addr := runServer(t, func(string) []rawFrame {
				var frames []rawFrame
				for _, p := range tc.frames {
					frames = append(frames, marshal(t, p))
				}
				return frames
			})
			c, err := NewClient(addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err = c.ReadResult(ctx, "r1")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ReadResult returned %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
