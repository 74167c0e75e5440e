package carsvc.example;

import io.grpc.ClientInterceptor;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.stub.MetadataUtils;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

/**
 * A carsvc worker and a carsvc client in Java, written from proto/car/v1 and docs/ alone.
 *
 * <pre>
 *   java -jar target/carsvc-java-example.jar worker --target 127.0.0.1:50051 \
 *       --worker-id java-1 --agents 'java-mapper*,java-reducer' [--sleep-ms N]
 *   java -jar target/carsvc-java-example.jar mapreduce --target 127.0.0.1:50051 \
 *       --mapper java-mapper --reducer java-reducer --items a.txt,b.txt [--json]
 * </pre>
 *
 * The worker reads its token from CARSVC_WORKER_TOKEN, the client from CARSVC_CLIENT_TOKEN;
 * without one the calls carry none (a sidecar without tokens).
 */
public final class Main {
  /** The sidecar's default max_message_bytes: a worker's channel must accept as much. */
  static final int MAX_MESSAGE_BYTES = 16 << 20;

  private Main() {}

  public static void main(String[] argv) throws Exception {
    if (argv.length == 0 || !(argv[0].equals("worker") || argv[0].equals("mapreduce"))) {
      System.err.println("usage: carsvc-java-example worker|mapreduce --target HOST:PORT [options]");
      System.exit(2);
    }
    Map<String, String> options = parse(Arrays.copyOfRange(argv, 1, argv.length));
    String target = options.getOrDefault("target", "127.0.0.1:50051");
    boolean worker = argv[0].equals("worker");
    ManagedChannel channel = channel(target, worker ? "CARSVC_WORKER_TOKEN" : "CARSVC_CLIENT_TOKEN");
    int code;
    try {
      code = worker ? new JavaWorker(options).run(channel) : new MapReduceClient(options).run(channel);
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.exit(code);
  }

  /**
   * A plaintext channel (use {@code useTransportSecurity()} and a trust manager for TLS) that
   * accepts messages up to the sidecar's max_message_bytes and sends the bearer token, when
   * the environment has one, as {@code authorization: Bearer <token>} on every call.
   */
  static ManagedChannel channel(String target, String tokenVariable) {
    ManagedChannelBuilder<?> builder =
        ManagedChannelBuilder.forTarget(target).usePlaintext().maxInboundMessageSize(MAX_MESSAGE_BYTES);
    String token = System.getenv(tokenVariable);
    if (token != null && !token.isEmpty()) {
      Metadata headers = new Metadata();
      headers.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + token);
      ClientInterceptor bearer = MetadataUtils.newAttachHeadersInterceptor(headers);
      builder.intercept(bearer);
    }
    return builder.build();
  }

  /** {@code --name value} pairs, and {@code --flag} alone as "true". */
  static Map<String, String> parse(String[] args) {
    Map<String, String> options = new HashMap<>();
    for (int i = 0; i < args.length; i++) {
      if (!args[i].startsWith("--")) {
        throw new IllegalArgumentException("unexpected argument " + args[i]);
      }
      String name = args[i].substring(2);
      boolean hasValue = i + 1 < args.length && !args[i + 1].startsWith("--");
      options.put(name, hasValue ? args[++i] : "true");
    }
    return options;
  }

  static List<String> list(String commaSeparated) {
    List<String> items = new ArrayList<>();
    for (String item : commaSeparated.split(",")) {
      if (!item.isBlank()) {
        items.add(item.trim());
      }
    }
    return items;
  }
}
