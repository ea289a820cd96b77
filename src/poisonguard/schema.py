"""Column names and the pyarrow schema of a normalised record.

Every row poisonguard handles, whatever layout it arrived in (instruction, chat, document),
is normalised into one flat record with the columns below. Names are defined once here and
imported everywhere else (never retyped as string literals).

Layouts
-------
instruction : ``instruction``, ``input`` (may be empty), ``output``
chat        : ``messages`` (a JSON string of ``[{"role", "content"}, ...]``; ShareGPT
              ``conversations`` with ``from``/``value`` is converted on ingest)
document    : ``text`` (retrieval corpora; no response)

Derived text fields used by detectors
-------------------------------------
prompt   : what the model is shown (instruction + input; system/user turns; document text)
response : what the model is taught to say (output; assistant turns; empty for documents)
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa

# identity and provenance
ID: Final = "id"
SOURCE: Final = "source"
KIND: Final = "kind"
CONTENT_HASH: Final = "content_hash"
FILE: Final = "file"
LINE: Final = "line"
COLLECTOR: Final = "collector"
COLLECTED_AT: Final = "collected_at"
INGESTED_AT: Final = "ingested_at"

# content
INSTRUCTION: Final = "instruction"
INPUT: Final = "input"
OUTPUT: Final = "output"
MESSAGES: Final = "messages"
TEXT: Final = "text"

# derived text
PROMPT: Final = "prompt"
RESPONSE: Final = "response"

# kinds
KIND_INSTRUCTION: Final = "instruction"
KIND_CHAT: Final = "chat"
KIND_DOCUMENT: Final = "document"
KINDS: Final = (KIND_INSTRUCTION, KIND_CHAT, KIND_DOCUMENT)

# decisions and outputs
DECISION: Final = "decision"
KEEP: Final = "keep"
REVIEW: Final = "review"
QUARANTINE: Final = "quarantine"
DECISIONS: Final = (KEEP, REVIEW, QUARANTINE)
SCORE: Final = "score"
DETECTORS: Final = "detectors"
EVIDENCE: Final = "evidence"
FINDING: Final = "finding"

# an incremental night's delta set: how many rows of the whole data each row stands for (a new,
# watched or twin row 1, a baseline row the old rows it was sampled from); detectors that compare
# a share of all prompts with a bound estimate it with these weights. Not a record column.
SAMPLE_WEIGHT: Final = "sample_weight"
# an incremental night's delta set: each row's sample weight for the detectors that do not compare
# the copies of one prompt (``Detector.compares_copies`` False), which do not see the prompt twins:
# NaN on a twin row, and a baseline row also stands for the twins. Not a record column.
TWIN_FREE_WEIGHT: Final = "sample_weight_without_twins"

# rejected rows
REASON: Final = "reason"
FIELD: Final = "field"
RAW: Final = "raw"

CONTENT_FIELDS: Final = {
    KIND_INSTRUCTION: (INSTRUCTION, INPUT, OUTPUT),
    KIND_CHAT: (MESSAGES,),
    KIND_DOCUMENT: (TEXT,),
}

RECORD_SCHEMA: Final = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(KIND, pa.string(), nullable=False),
        pa.field(INSTRUCTION, pa.string(), nullable=False),
        pa.field(INPUT, pa.string(), nullable=False),
        pa.field(OUTPUT, pa.string(), nullable=False),
        pa.field(MESSAGES, pa.string(), nullable=False),
        pa.field(TEXT, pa.string(), nullable=False),
        pa.field(PROMPT, pa.string(), nullable=False),
        pa.field(RESPONSE, pa.string(), nullable=False),
        pa.field(CONTENT_HASH, pa.string(), nullable=False),
        pa.field(FILE, pa.string(), nullable=False),
        pa.field(LINE, pa.int64(), nullable=False),
        pa.field(COLLECTOR, pa.string(), nullable=False),
        pa.field(COLLECTED_AT, pa.string(), nullable=False),
        pa.field(INGESTED_AT, pa.string(), nullable=False),
    ]
)
RECORD_COLUMNS: Final = tuple(RECORD_SCHEMA.names)

REJECTED_SCHEMA: Final = pa.schema(
    [
        pa.field(FILE, pa.string(), nullable=False),
        pa.field(LINE, pa.int64(), nullable=False),
        pa.field(FIELD, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(RAW, pa.string(), nullable=False),
    ]
)
REJECTED_COLUMNS: Final = tuple(REJECTED_SCHEMA.names)

# quarantine / review rows: the record columns plus the decision
DECIDED_EXTRA: Final = (DECISION, SCORE, DETECTORS, EVIDENCE, FINDING)
