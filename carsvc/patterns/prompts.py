"""Every prompt template a pattern builds, as named constants (pinned by tests
and listed in docs/patterns/)."""

from __future__ import annotations

# map_reduce: the task each mapper gets (seed map_reduce.rs).
MAP_ITEM_TASK = "{task}\n\nProcess this item: {item}"
# map_reduce: one line per succeeded mapper in the reducer's task; answers are
# cut to MAP_SUMMARY_CHARS characters.
MAP_SUMMARY_LINE = "- [{name}] {answer}"
MAP_SUMMARY_CHARS = 300
# map_reduce: the reducer's task. `count` is the number of mapper outputs.
REDUCE_TASK = (
    "Original task: {task}\n\nResults from {count} sub-agents:\n{summaries}\n\n"
    "Combine these into a single coherent result."
)
