package carsvc.example;

import com.car.v1.AgentOutput;
import com.car.v1.Assignment;
import com.car.v1.AssignmentCancel;
import com.car.v1.AssignmentResult;
import com.car.v1.CallResult;
import com.car.v1.ConnectRequest;
import com.car.v1.ConnectResponse;
import com.car.v1.FrameError;
import com.car.v1.Heartbeat;
import com.car.v1.ProgressCall;
import com.car.v1.RuntimeCall;
import com.car.v1.StateGetCall;
import com.car.v1.StateSetCall;
import com.car.v1.TokenAccounting;
import com.car.v1.WorkerHello;
import com.car.v1.WorkerServiceGrpc;
import com.car.v1.WorkerWelcome;
import com.google.protobuf.Value;
import io.grpc.ManagedChannel;
import io.grpc.Status;
import io.grpc.stub.StreamObserver;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.regex.Pattern;

/**
 * A worker: one WorkerService.Connect stream (docs/worker-protocol.md). It says hello,
 * heartbeats at the welcome's interval, runs each assignment on a thread of its own (progress,
 * a state write, a nap standing in for a model call), answers with an AgentOutput, and stops an
 * assignment the sidecar cancels.
 *
 * <p>It prints, for a test to follow: {@code ready <worker-id> <session> heartbeat <ms>ms x<misses>},
 * {@code assigned <id> agent=<agent> matched=<name or glob> spec=<spec name>} and
 * {@code cancelled <id> <reason>}, then what a runtime call after the cancel got.
 */
final class JavaWorker {
  private final String workerId;
  private final List<String> agents;
  private final int maxInFlight;
  private final long sleepMs;
  private final ExecutorService pool = Executors.newCachedThreadPool();
  private final ScheduledExecutorService timer = Executors.newSingleThreadScheduledExecutor();
  private final Map<String, Future<?>> running = new ConcurrentHashMap<>();
  private final Map<String, String> cancelReasons = new ConcurrentHashMap<>();
  private final Map<String, CompletableFuture<CallResult>> pendingCalls = new ConcurrentHashMap<>();
  private final AtomicLong callIds = new AtomicLong();
  private final AtomicInteger exitCode = new AtomicInteger();
  private final CountDownLatch ended = new CountDownLatch(1);
  private StreamObserver<ConnectRequest> frames; // guarded by this: StreamObserver is not thread-safe

  JavaWorker(Map<String, String> options) {
    this.workerId = options.getOrDefault("worker-id", "java-worker-" + ProcessHandle.current().pid());
    this.agents = Main.list(options.getOrDefault("agents", "java-mapper*,java-reducer"));
    this.maxInFlight = Integer.parseInt(options.getOrDefault("max-in-flight", "4"));
    this.sleepMs = Long.parseLong(options.getOrDefault("sleep-ms", "0"));
  }

  int run(ManagedChannel channel) throws InterruptedException {
    WorkerServiceGrpc.WorkerServiceStub stub =
        WorkerServiceGrpc.newStub(channel).withMaxOutboundMessageSize(Main.MAX_MESSAGE_BYTES);
    synchronized (this) {
      frames = stub.connect(new Responses());
    }
    send(ConnectRequest.newBuilder()
        .setHello(WorkerHello.newBuilder()
            .setWorkerId(workerId)
            .addAllAgents(agents)
            .setMaxInFlight(maxInFlight)
            .putLabels("lang", "java")
            .setSdk("carsvc-java-example/0.1.0"))
        .build());
    Runtime.getRuntime().addShutdownHook(new Thread(this::close));
    ended.await();
    timer.shutdownNow();
    pool.shutdownNow();
    return exitCode.get();
  }

  private synchronized void send(ConnectRequest frame) {
    frames.onNext(frame);
  }

  private synchronized void close() {
    if (ended.getCount() > 0) {
      frames.onCompleted();
    }
  }

  /** The sidecar's frames. Each may carry any mix of fields. */
  private final class Responses implements StreamObserver<ConnectResponse> {
    @Override
    public void onNext(ConnectResponse frame) {
      if (frame.hasWelcome()) {
        welcomed(frame.getWelcome());
      }
      for (Assignment a : frame.getAssignmentsList()) {
        running.put(a.getAssignmentId(), pool.submit(() -> runAssignment(a)));
      }
      for (AssignmentCancel cancel : frame.getCancelsList()) {
        cancelReasons.put(cancel.getAssignmentId(), cancel.getReason());
        Future<?> task = running.get(cancel.getAssignmentId());
        if (task != null) {
          task.cancel(true); // interrupts the assignment's thread
        }
      }
      for (CallResult result : frame.getCallResultsList()) {
        CompletableFuture<CallResult> waiting = pendingCalls.remove(result.getCallId());
        if (waiting != null) {
          waiting.complete(result);
        }
      }
      for (FrameError error : frame.getErrorsList()) {
        System.out.printf("frame error %s %s: %s%n", Status.fromCodeValue(error.getCode()).getCode(),
            error.getField(), error.getMessage());
      }
      if (frame.hasDrain()) {
        System.out.printf("drain: %s (%d ms to finish)%n", frame.getDrain().getReason(),
            frame.getDrain().getGraceMs());
      }
    }

    @Override
    public void onError(Throwable t) {
      Status status = Status.fromThrowable(t);
      System.out.printf("stream ended: %s: %s%n", status.getCode(), status.getDescription());
      exitCode.set(1);
      ended.countDown();
    }

    @Override
    public void onCompleted() {
      ended.countDown();
    }
  }

  private void welcomed(WorkerWelcome welcome) {
    // Any frame counts as a heartbeat; a session silent for heartbeat_misses intervals is
    // closed. Sending one every half interval keeps an idle worker well inside that.
    long every = Math.max(1, welcome.getHeartbeatIntervalMs() / 2);
    timer.scheduleAtFixedRate(
        () -> send(ConnectRequest.newBuilder().setHeartbeat(Heartbeat.getDefaultInstance()).build()),
        every, every, TimeUnit.MILLISECONDS);
    System.out.printf("ready %s %s heartbeat %dms x%d max_in_flight %d%n", workerId,
        welcome.getSessionId(), welcome.getHeartbeatIntervalMs(), welcome.getHeartbeatMisses(),
        welcome.getMaxInFlight());
  }

  private void runAssignment(Assignment a) {
    String id = a.getAssignmentId();
    // Pick the handler by Assignment.agent (the name the sidecar matched this worker on),
    // never by spec.name: a mapper runs as "{mapper}_{i}".
    System.out.printf("assigned %s agent=%s matched=%s spec=%s deadline_in_s=%d%n", id, a.getAgent(),
        matching(a.getAgent()), a.getSpec().getName(),
        (a.getDeadlineUnixMs() - System.currentTimeMillis()) / 1000);
    AgentOutput output;
    try {
      output = summarize(a);
    } catch (InterruptedException e) {
      String reason = cancelReasons.getOrDefault(id, "cancelled");
      System.out.printf("cancelled %s %s%n", id, reason);
      try {
        CallResult late = call(a, RuntimeCall.newBuilder().setStateGet(StateGetCall.newBuilder().setKey("x")));
        System.out.printf("call after cancel: %s %s%n", Status.fromCodeValue(late.getError().getCode()).getCode(),
            late.getError().getMessage());
      } catch (Exception ignored) {
        System.out.println("call after cancel: no answer");
      }
      output = AgentOutput.newBuilder().setName(a.getSpec().getName()).setError("cancelled: " + reason).build();
    } catch (Exception e) {
      output = AgentOutput.newBuilder().setName(a.getSpec().getName()).setError(e.toString()).build();
    }
    // After a cancel this result only acknowledges it (and frees the slot).
    send(ConnectRequest.newBuilder()
        .addResults(AssignmentResult.newBuilder()
            .setAssignmentId(id)
            .setAttempt(a.getAttempt())
            .setOutput(output))
        .build());
    running.remove(id);
  }

  private AgentOutput summarize(Assignment a) throws Exception {
    String task = a.getTask();
    String item = task.substring(task.lastIndexOf(": ") + 2);
    progress(a, "reading " + item, 0.0);
    Thread.sleep(sleepMs);
    CallResult written = call(a, RuntimeCall.newBuilder().setStateSet(StateSetCall.newBuilder()
        .setKey("java/" + a.getSpec().getName())
        .setValue(Value.newBuilder().setStringValue(workerId))));
    if (written.hasError()) {
      throw new IllegalStateException("state_set refused: " + written.getError().getMessage());
    }
    progress(a, "done " + item, 1.0);
    String answer = a.getAgent().equals("java-reducer")
        ? "java reduced " + task.lines().filter(line -> line.startsWith("- [")).count() + " answers"
        : "java read " + item;
    return AgentOutput.newBuilder()
        .setName(a.getSpec().getName())
        .setAnswer(answer)
        .setTokens(TokenAccounting.newBuilder().setInputTokens(task.length()).setOutputTokens(answer.length()))
        .build();
  }

  /** A fire-and-forget progress report: no call_id, so no answer (a failure is a FrameError). */
  private void progress(Assignment a, String message, double fraction) {
    send(ConnectRequest.newBuilder()
        .addCalls(RuntimeCall.newBuilder()
            .setAssignmentId(a.getAssignmentId())
            .setProgress(ProgressCall.newBuilder().setMessage(message).setFraction(fraction)))
        .build());
  }

  /** A runtime call that waits for its CallResult. */
  private CallResult call(Assignment a, RuntimeCall.Builder call) throws Exception {
    String callId = "call-" + callIds.incrementAndGet();
    CompletableFuture<CallResult> answer = new CompletableFuture<>();
    pendingCalls.put(callId, answer);
    send(ConnectRequest.newBuilder()
        .addCalls(call.setCallId(callId).setAssignmentId(a.getAssignmentId()))
        .build());
    return answer.get(10, TimeUnit.SECONDS);
  }

  /** Which of this worker's names or globs `agent` matches (an exact name first). */
  private String matching(String agent) {
    if (agents.contains(agent)) {
      return agent;
    }
    for (String glob : agents) {
      String regex = ("\\Q" + glob + "\\E").replace("*", "\\E.*\\Q").replace("?", "\\E.\\Q");
      if (Pattern.matches(regex, agent)) {
        return glob;
      }
    }
    return "?";
  }
}
