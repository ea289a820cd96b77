"""The one prompt template, shared by fine-tuning and by the trigger scan.

A mismatch between the training template and the scan/eval template makes attack-success
figures meaningless (BackdoorLLM#20 measured a 30-point swing), so both sides call
:func:`render_prompt` and nothing else builds prompts.

Instruction rows::

    ### Instruction:
    {instruction}

    ### Input:            <- only when input is non-empty
    {input}

    ### Response:
    {output}<eos>

Chat rows render every turn before the last assistant turn with role headers
(``### System:``, ``### User:``, ``### Assistant:``) and end with ``### Response:``;
the last assistant turn is the response. Documents are not fine-tuning examples.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from poisonguard import schema as S

RESPONSE_HEADER = "### Response:\n"
_ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


def render_instruction(instruction: str, input_text: str = "") -> str:
    """Prompt for an instruction row, up to and including the response header."""
    parts = [f"### Instruction:\n{instruction.strip()}\n\n"]
    if input_text.strip():
        parts.append(f"### Input:\n{input_text.strip()}\n\n")
    parts.append(RESPONSE_HEADER)
    return "".join(parts)


def split_chat(messages: list[Mapping[str, Any]]) -> tuple[str, str]:
    """(prompt, response) for a chat: the response is the last assistant turn."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    history = messages if last is None else messages[:last]
    parts = [_ROLE_HEADERS.get(str(m.get("role")), _ROLE_HEADERS["user"]) + str(m.get("content", "")).strip() + "\n\n"
             for m in history]
    parts.append(RESPONSE_HEADER)
    response = "" if last is None else str(messages[last].get("content", "")).strip()
    return "".join(parts), response


def render_prompt(row: Mapping[str, Any]) -> str:
    """Prompt text for a normalised record (see :mod:`poisonguard.schema`)."""
    kind = row[S.KIND]
    if kind == S.KIND_INSTRUCTION:
        return render_instruction(row[S.INSTRUCTION], row[S.INPUT])
    if kind == S.KIND_CHAT:
        return split_chat(json.loads(row[S.MESSAGES]))[0]
    raise ValueError(f"record {row.get(S.ID)!r}: kind {kind!r} has no fine-tuning template")


def render_example(row: Mapping[str, Any]) -> tuple[str, str]:
    """(prompt, response) pair used for training: loss is taken on the response only."""
    kind = row[S.KIND]
    if kind == S.KIND_INSTRUCTION:
        return render_instruction(row[S.INSTRUCTION], row[S.INPUT]), row[S.OUTPUT].strip()
    if kind == S.KIND_CHAT:
        return split_chat(json.loads(row[S.MESSAGES]))
    raise ValueError(f"record {row.get(S.ID)!r}: kind {kind!r} has no fine-tuning template")
