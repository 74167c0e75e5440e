"""Reading agents' answers: the labelled lines one agent's task quotes from
others, and the JSON value a reviewer or an advisor answers with."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from carsvc._proto.car.v1 import types_pb2
from carsvc.domain.infra import succeeded
from carsvc.patterns.prompts import ANSWER_LINE

AgentOutput = types_pb2.AgentOutput
_FENCE = re.compile(r"```[a-zA-Z]*\s*\n(.*?)```", re.DOTALL)


def answer_lines(outputs: Iterable[AgentOutput]) -> str:
    """One ANSWER_LINE per succeeded output, joined by newlines."""
    return "\n".join(ANSWER_LINE.format(name=o.name, answer=o.answer) for o in outputs if succeeded(o))


def extract_json(text: str) -> Any:
    """The JSON value in an agent's answer: the whole answer, a fenced block, or
    the outermost {...} / [...] span. None when there is none."""
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    for opening, closing in (("{", "}"), ("[", "]")):
        start, end = text.find(opening), text.rfind(closing)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None
