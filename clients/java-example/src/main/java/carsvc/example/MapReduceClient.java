package carsvc.example;

import com.car.v1.AgentOutput;
import com.car.v1.AgentRef;
import com.car.v1.AgentSpec;
import com.car.v1.GetRunRequest;
import com.car.v1.MapReduceResult;
import com.car.v1.MapReduceRun;
import com.car.v1.ReadRunResultRequest;
import com.car.v1.ReadRunResultResponse;
import com.car.v1.Run;
import com.car.v1.RunEvent;
import com.car.v1.RunResult;
import com.car.v1.RunServiceGrpc;
import com.car.v1.RunStatus;
import com.car.v1.StartRunRequest;
import com.car.v1.WatchRunRequest;
import com.car.v1.WatchRunResponse;
import com.google.protobuf.ByteString;
import com.google.protobuf.InvalidProtocolBufferException;
import io.grpc.ManagedChannel;
import io.grpc.StatusRuntimeException;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.TreeSet;

/**
 * A client: starts a map-reduce (RunService.StartRun), follows its events (WatchRun) to the
 * end, reads the run (GetRun, and ReadRunResult when the result was too large to send inline)
 * and prints the answers, or why the run failed. With --json: one JSON object.
 */
final class MapReduceClient {
  private final Map<String, String> options;

  MapReduceClient(Map<String, String> options) {
    this.options = options;
  }

  int run(ManagedChannel channel) throws InvalidProtocolBufferException {
    RunServiceGrpc.RunServiceBlockingStub runs = RunServiceGrpc.newBlockingStub(channel);
    StartRunRequest request = StartRunRequest.newBuilder()
        .setAgentId("java-client")
        .setMapReduce(MapReduceRun.newBuilder()
            .setMapper(agent(options.getOrDefault("mapper", "java-mapper")))
            .setReducer(agent(options.getOrDefault("reducer", "java-reducer")))
            .setTask(options.getOrDefault("task", "Summarize"))
            .addAllItems(Main.list(options.getOrDefault("items", "a.txt,b.txt,c.txt"))))
        .build();
    String runId;
    Map<String, Integer> kinds = new TreeMap<>();
    TreeSet<String> workers = new TreeSet<>();
    Run run;
    try {
      runId = runs.startRun(request).getRun().getRunId();
      Iterator<WatchRunResponse> batches =
          runs.watchRun(WatchRunRequest.newBuilder().setRunId(runId).build());
      while (batches.hasNext()) {
        for (RunEvent event : batches.next().getEventsList()) {
          String kind = event.getKindCase().name().toLowerCase();
          kinds.merge(kind, 1, Integer::sum);
          if (event.hasAgentFinished()) {
            workers.add(event.getAgentFinished().getWorkerId());
          }
        }
      }
      run = runs.getRun(GetRunRequest.newBuilder().setRunId(runId).build()).getRun();
    } catch (StatusRuntimeException e) {
      System.err.printf("carsvc: %s: %s%n", e.getStatus().getCode(), e.getStatus().getDescription());
      return 1;
    }
    RunResult result = run.hasResult() ? run.getResult()
        : run.getResultOmitted() ? readResult(runs, runId) : RunResult.getDefaultInstance();
    MapReduceResult mapReduce = result.getMapReduce();
    List<String> answers = new ArrayList<>();
    for (AgentOutput output : mapReduce.getMapOutputsList()) {
      answers.add(output.hasError() ? "error: " + output.getError() : output.getAnswer());
    }
    boolean succeeded = run.getStatus() == RunStatus.RUN_STATUS_SUCCEEDED;
    if (options.containsKey("json")) {
      Json json = new Json()
          .field("run_id", runId)
          .field("status", run.getStatus().name())
          .field("reason", run.getTerminationReason())
          .field("detail", run.getTerminationDetail())
          .field("reduced_answer", mapReduce.getReducedAnswer())
          .field("map_answers", answers)
          .field("workers", new ArrayList<>(workers))
          .field("events", kinds);
      System.out.println(json);
    } else {
      System.out.printf("run %s: %s (%s)%n", runId, run.getStatus().name(), run.getTerminationReason());
      if (!succeeded) {
        System.out.println("why: " + run.getTerminationDetail());
      }
      answers.forEach(answer -> System.out.println("  " + answer));
      System.out.println("reduced: " + mapReduce.getReducedAnswer());
    }
    return succeeded ? 0 : 1;
  }

  private static AgentRef agent(String name) {
    return AgentRef.newBuilder().setSpec(AgentSpec.newBuilder().setName(name)).build();
  }

  /** A result too large to send inline, read in chunks and parsed as one RunResult. */
  private static RunResult readResult(RunServiceGrpc.RunServiceBlockingStub runs, String runId)
      throws InvalidProtocolBufferException {
    ByteString whole = ByteString.EMPTY;
    Iterator<ReadRunResultResponse> chunks =
        runs.readRunResult(ReadRunResultRequest.newBuilder().setRunId(runId).build());
    while (chunks.hasNext()) {
      whole = whole.concat(chunks.next().getChunk());
    }
    return RunResult.parseFrom(whole);
  }
}
