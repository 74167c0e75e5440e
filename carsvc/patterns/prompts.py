"""Every prompt template a pattern builds, as named constants (pinned by tests
and listed in docs/patterns/)."""

from __future__ import annotations

# map_reduce: the task each mapper gets (seed map_reduce.rs).
MAP_ITEM_TASK = "{task}\n\nProcess this item: {item}"
# map_reduce: one line per succeeded mapper in the reducer's task; answers are
# cut to MAP_SUMMARY_BYTES bytes of UTF-8, at a character boundary (car-multi's
# `truncate(&o.answer, 300)`).
MAP_SUMMARY_LINE = "- [{name}] {answer}"
MAP_SUMMARY_BYTES = 300
# map_reduce: the reducer's task. `count` is the number of mapper outputs;
# `summaries` the MAP_SUMMARY_LINEs joined by newlines, as many as keep the task
# within max_field_bytes, then MAP_SUMMARIES_OMITTED_LINE for the rest.
REDUCE_TASK = (
    "Original task: {task}\n\nResults from {count} sub-agents:\n{summaries}\n\n"
    "Combine these into a single coherent result."
)
# map_reduce: the last summary line when some did not fit; `omitted` is how many
# were left out, `limit` max_field_bytes.
MAP_SUMMARIES_OMITTED_LINE = "- ({omitted} more results left out to keep this task within {limit} bytes)"

# -- shared pieces -----------------------------------------------------------------
# One line per agent answer wherever a prompt lists several (full answers, no cut).
ANSWER_LINE = "- [{name}] {answer}"
# A worker that produced no answer, in the supervisor's review.
FAILED_ANSWER_LINE = "- [{name}] (no answer: {error})"
# Stands in for an answer that does not exist.
NO_ANSWER = "(no answer)"

# -- swarm / pipeline ------------------------------------------------------------------
# sequential swarm and pipeline: the task of agent k > 0 when agents before it
# succeeded; `answers` holds one ANSWER_LINE per earlier succeeded agent.
SEQUENTIAL_TASK = "{task}\n\nAnswers so far, from the agents before you:\n{answers}\n\nBuild on them."
# parallel and sequential swarm: the synthesizer's task. `count` is the number of
# agents; `answers` one ANSWER_LINE per succeeded agent.
SYNTHESIZE_TASK = (
    "Original task: {task}\n\nAnswers from {count} agents:\n{answers}\n\n"
    "Synthesize these into a single coherent answer."
)
# debate: every agent's round-2 task. `own` is its round-1 answer (NO_ANSWER if
# none); `others` one ANSWER_LINE per other agent that answered in round 1.
DEBATE_REVISE_TASK = (
    "{task}\n\nYour first answer:\n{own}\n\nThe other agents answered:\n{others}\n\n"
    "Critique their answers, then give your final answer."
)
# debate: the judge's (synthesizer's) task over the round-2 answers.
DEBATE_JUDGE_TASK = (
    "Original task: {task}\n\nFinal answers after a debate between {count} agents:\n{answers}\n\n"
    "Judge the debate: pick the best answer and reply with it."
)

# -- supervisor ------------------------------------------------------------------------
# The supervisor's review of one round; `answers` has an ANSWER_LINE or a
# FAILED_ANSWER_LINE per worker.
SUPERVISOR_REVIEW_TASK = (
    "Task: {task}\n\nRound {round} of {max_rounds}. The workers answered:\n{answers}\n\n"
    "Review their work. If it fully accomplishes the task, reply APPROVED. Otherwise "
    "reply with specific feedback for the next round."
)
# A worker's task in rounds after the first: its previous answer (NO_ANSWER if
# none) and the supervisor's last review.
SUPERVISOR_REVISE_TASK = (
    "{task}\n\nYour previous answer:\n{previous}\n\nSupervisor feedback:\n{feedback}\n\n"
    "Revise your answer to address the feedback."
)

# -- vote --------------------------------------------------------------------------------
# The optional synthesizer's task; `answers` one ANSWER_LINE per succeeded vote,
# `majority` the normalised-majority answer with `votes` of `count` votes.
VOTE_SYNTHESIZE_TASK = (
    "Task: {task}\n\n{count} agents answered:\n{answers}\n\n"
    "The most common answer ({votes} of {count} votes) was:\n{majority}\n\n"
    "Pick the best answer and reply with it alone."
)

# -- adversarial review ---------------------------------------------------------------
# The reviewer's whole task: the work and the criteria, nothing about the author.
REVIEW_TASK = (
    "Review the work below against the acceptance criteria. You did not write it and "
    "have no other context: judge only what you see.\n\nWork:\n{work_output}\n\n"
    "Criteria:\n{criteria}\n\n"
    "For every criterion decide whether the work meets it, with evidence (quote it, or "
    "cite file:line). Reply with only a JSON object: "
    '{{"findings": [{{"criterion": "<the criterion, verbatim>", "passed": true, '
    '"evidence": "...", "severity": "blocker|major|minor|info"}}]}}'
)
# One numbered criterion in REVIEW_TASK (numbers start at 1).
REVIEW_CRITERION_LINE = "{number}. {criterion}"

# -- tournament ---------------------------------------------------------------------------
# A fresh judge's task for one match. It answers A (left) or B (right).
TOURNAMENT_JUDGE_TASK = (
    "Task: {task}\n\nTwo candidate answers.\n\nA ({left}):\n{left_answer}\n\n"
    "B ({right}):\n{right_answer}\n\n"
    "Which answer better accomplishes the task? Reply with exactly one letter: A or B."
)

# -- spawn_subtask ------------------------------------------------------------------------
# The system prompt of an ephemeral sub-agent spawned by `parent`.
SUBTASK_SYSTEM_PROMPT = (
    "You are a focused sub-agent spawned by '{parent}'. Complete only the task you are "
    "given, with only the tools you have, and reply with the result."
)

# -- advisor ------------------------------------------------------------------------------
# The advisor's task for one consultation: the advised agent's task and its question.
ADVISOR_TASK = (
    "An agent working on a task asks for your advice. You only advise: you do not act, "
    "call tools or change state.\n\nThe agent's task:\n{task}\n\nThe agent asks:\n{prompt}\n\n"
    "Reply with only a JSON object, one of: "
    '{{"verdict": "continue", "rationale": "..."}}, '
    '{{"verdict": "plan", "guidance": "..."}}, '
    '{{"verdict": "correction", "guidance": "..."}}, '
    '{{"verdict": "stop", "reason": "..."}}, '
    '{{"verdict": "uncertain", "reason": "..."}}'
)
