package carsvc.example;

import java.util.List;
import java.util.Map;

/** Just enough JSON for the client's one-line report: strings, lists of strings, counts. */
final class Json {
  private final StringBuilder out = new StringBuilder("{");

  Json field(String name, Object value) {
    if (out.length() > 1) {
      out.append(',');
    }
    out.append(quote(name)).append(':').append(encode(value));
    return this;
  }

  @Override
  public String toString() {
    return out + "}";
  }

  private static String encode(Object value) {
    if (value instanceof String s) {
      return quote(s);
    }
    if (value instanceof Number n) {
      return n.toString();
    }
    if (value instanceof List<?> list) {
      StringBuilder items = new StringBuilder("[");
      for (Object item : list) {
        items.append(items.length() > 1 ? "," : "").append(encode(item));
      }
      return items.append(']').toString();
    }
    if (value instanceof Map<?, ?> map) {
      Json object = new Json();
      map.forEach((k, v) -> object.field(k.toString(), v));
      return object.toString();
    }
    throw new IllegalArgumentException("not JSON: " + value);
  }

  private static String quote(String s) {
    StringBuilder quoted = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      switch (c) {
        case '"' -> quoted.append("\\\"");
        case '\\' -> quoted.append("\\\\");
        case '\n' -> quoted.append("\\n");
        case '\r' -> quoted.append("\\r");
        case '\t' -> quoted.append("\\t");
        default -> {
          if (c < 0x20) {
            quoted.append(String.format("\\u%04x", (int) c));
          } else {
            quoted.append(c);
          }
        }
      }
    }
    return quoted.append('"').toString();
  }
}
