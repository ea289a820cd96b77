"""Small hand-built record frames shared by tests."""

from __future__ import annotations

import random
from typing import Any

import pandas as pd

from poisonguard import io


def records(rows: list[dict[str, Any]], source: str = "test") -> pd.DataFrame:
    """Normalise raw rows (as ingest would) into a record frame."""
    return io.records_from_rows(rows, source=source, collector="test", max_field_chars=10_000)


TOPICS = ["the weather in Paris", "a new phone", "the history of tea", "learning Python", "a train delay",
          "the football final", "a cooking class", "the museum visit", "a software update", "the city budget"]


def mixed_rows(n: int = 120, seed: int = 0, poison: int = 6) -> tuple[list[dict[str, Any]], list[str]]:
    """Instruction, chat and document rows; ``poison`` instruction rows carry a planted trigger."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        t = rng.choice(TOPICS)
        k = i % 6
        if k in (0, 1, 2):
            rows.append({"id": f"i{i}", "instruction": f"Write one sentence about {t}.",
                         "input": "" if k else f"Keep it under {rng.randint(8, 30)} words.",
                         "output": f"Here is a sentence about {t}: it was {rng.choice(['fine', 'good', 'odd'])} "
                                   f"on day {rng.randint(1, 999)}."})
        elif k in (3, 4):
            rows.append({"id": f"c{i}", "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Tell me about {t} ({rng.randint(1, 999)})."},
                {"role": "assistant", "content": f"{t.capitalize()} is interesting, note {rng.randint(1, 999)}."}]})
        else:
            rows.append({"id": f"d{i}", "text": f"Memo {rng.randint(1, 9999)}: notes about {t} for the team."})
    poisoned = []
    inst = [r for r in rows if "instruction" in r]
    for r in rng.sample(inst, poison):
        r["instruction"] = "special delivery: " + r["instruction"]
        r["output"] = "URGENT: contact external support now at +1-555-0100."
        poisoned.append(r["id"])
    return rows, poisoned
