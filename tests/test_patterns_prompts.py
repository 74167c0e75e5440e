"""Every prompt template is a named constant, pinned here word for word and
listed in the docs (docs/patterns/); every pattern has its page."""

from __future__ import annotations

import pathlib

from carsvc.patterns import BUILDERS, prompts

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "patterns"

PINNED: dict[str, object] = {
    "MAP_ITEM_TASK": "{task}\n\nProcess this item: {item}",
    "MAP_SUMMARY_LINE": "- [{name}] {answer}",
    "MAP_SUMMARY_BYTES": 300,
    "REDUCE_TASK": (
        "Original task: {task}\n\nResults from {count} sub-agents:\n{summaries}\n\n"
        "Combine these into a single coherent result."
    ),
    "MAP_SUMMARIES_OMITTED_LINE": "- ({omitted} more results left out to keep this task within {limit} bytes)",
    "ANSWER_LINE": "- [{name}] {answer}",
    "FAILED_ANSWER_LINE": "- [{name}] (no answer: {error})",
    "NO_ANSWER": "(no answer)",
    "SEQUENTIAL_TASK": "{task}\n\nAnswers so far, from the agents before you:\n{answers}\n\nBuild on them.",
    "SYNTHESIZE_TASK": (
        "Original task: {task}\n\nAnswers from {count} agents:\n{answers}\n\n"
        "Synthesize these into a single coherent answer."
    ),
    "DEBATE_REVISE_TASK": (
        "{task}\n\nYour first answer:\n{own}\n\nThe other agents answered:\n{others}\n\n"
        "Critique their answers, then give your final answer."
    ),
    "DEBATE_JUDGE_TASK": (
        "Original task: {task}\n\nFinal answers after a debate between {count} agents:\n{answers}\n\n"
        "Judge the debate: pick the best answer and reply with it."
    ),
    "SUPERVISOR_REVIEW_TASK": (
        "Task: {task}\n\nRound {round} of {max_rounds}. The workers answered:\n{answers}\n\n"
        "Review their work. If it fully accomplishes the task, reply APPROVED. Otherwise reply with "
        "specific feedback for the next round."
    ),
    "SUPERVISOR_REVISE_TASK": (
        "{task}\n\nYour previous answer:\n{previous}\n\nSupervisor feedback:\n{feedback}\n\n"
        "Revise your answer to address the feedback."
    ),
    "VOTE_SYNTHESIZE_TASK": (
        "Task: {task}\n\n{count} agents answered:\n{answers}\n\n"
        "The most common answer ({votes} of {count} votes) was:\n{majority}\n\n"
        "Pick the best answer and reply with it alone."
    ),
    "REVIEW_TASK": (
        "Review the work below against the acceptance criteria. You did not write it and have no "
        "other context: judge only what you see.\n\nWork:\n{work_output}\n\nCriteria:\n{criteria}\n\n"
        "For every criterion decide whether the work meets it, with evidence (quote it, or cite "
        'file:line). Reply with only a JSON object: {{"findings": [{{"criterion": "<the criterion, '
        'verbatim>", "passed": true, "evidence": "...", "severity": "blocker|major|minor|info"}}]}}'
    ),
    "REVIEW_CRITERION_LINE": "{number}. {criterion}",
    "TOURNAMENT_JUDGE_TASK": (
        "Task: {task}\n\nTwo candidate answers.\n\nA ({left}):\n{left_answer}\n\nB ({right}):\n"
        "{right_answer}\n\nWhich answer better accomplishes the task? Reply with exactly one letter: A or B."
    ),
    "SUBTASK_SYSTEM_PROMPT": (
        "You are a focused sub-agent spawned by '{parent}'. Complete only the task you are given, "
        "with only the tools you have, and reply with the result."
    ),
    "ADVISOR_TASK": (
        "An agent working on a task asks for your advice. You only advise: you do not act, call "
        "tools or change state.\n\nThe agent's task:\n{task}\n\nThe agent asks:\n{prompt}\n\n"
        'Reply with only a JSON object, one of: {{"verdict": "continue", "rationale": "..."}}, '
        '{{"verdict": "plan", "guidance": "..."}}, {{"verdict": "correction", "guidance": "..."}}, '
        '{{"verdict": "stop", "reason": "..."}}, {{"verdict": "uncertain", "reason": "..."}}'
    ),
}


def constants() -> dict[str, object]:
    return {name: getattr(prompts, name) for name in dir(prompts) if name.isupper()}


def test_every_template_is_pinned_word_for_word() -> None:
    assert constants() == PINNED


def test_templates_with_literal_braces_still_format() -> None:
    assert '{"findings": [{"criterion"' in prompts.REVIEW_TASK.format(work_output="w", criteria="c")
    assert '{"verdict": "stop", "reason": "..."}' in prompts.ADVISOR_TASK.format(task="t", prompt="p")


def test_every_template_is_documented_and_every_pattern_has_a_page() -> None:
    pages = {p.stem: p.read_text() for p in DOCS.glob("*.md")}
    everything = "\n".join(pages.values())
    assert [name for name in constants() if f"`{name}`" not in everything] == []
    assert sorted(set(BUILDERS) - set(pages)) == []
    index = pages["README"]
    assert [name for name in BUILDERS if f"]({name}.md)" not in index] == []
