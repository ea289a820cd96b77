"""Append-only, hash-chained audit log of what happened to the data and the models.

One JSON object per line in ``<state>/audit.jsonl`` (``<state>`` is ``$POISONGUARD_STATE`` or
``.poisonguard``)::

    {"seq": 7, "time": "2025-...Z", "actor": {"user": ..., "host": ..., "flow": ...},
     "action": "quarantined", "subject": {...}, "reason": "...", "details": {...},
     "prev_hash": "<hash of entry 6>", "hash": "<sha256 of this entry without 'hash'>"}

``hash`` is the SHA-256 of the entry's canonical JSON (sorted keys, no insignificant whitespace,
UTF-8) without the ``hash`` key; ``prev_hash`` of the first entry is 64 zeros. Editing an entry
breaks its hash; deleting or reordering entries breaks ``seq`` and the ``prev_hash`` chain; cutting
entries off the end is caught against ``audit.head`` (the last ``seq`` and ``hash``, rewritten on
every append). :func:`verify` names the first bad ``seq``.

The log records facts, it does not enforce access control: someone who can rewrite both files
can forge a consistent history. Publishing the head hash elsewhere (a ticket, a git commit, the
run report) pins the history up to that point.

Appends are serialised with an exclusive ``flock`` on ``audit.lock`` and ``fsync``-ed, so
concurrent processes (a nightly run and an on-call remediation) never interleave or fork the chain.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from poisonguard import paths

GENESIS = "0" * 64
STATE_ENV = "POISONGUARD_STATE"
ACTOR_ENV = "POISONGUARD_ACTOR"
LOG_FILE = "audit.jsonl"
HEAD_FILE = "audit.head"
LOCK_FILE = "audit.lock"

# actions (free-form strings are accepted; these are the ones poisonguard writes)
INGESTED = "ingested"
SNAPSHOT = "snapshot_cut"
QUARANTINED = "quarantined"
RELEASED = "released"
TRAINED = "trained"
SCANNED = "scanned"
PRUNED = "pruned"
PROMOTED = "promoted"
REVIEW_APPLIED = "review_applied"
REMEDIATED = "remediated"


def state_dir(state: Path | str | None = None) -> Path:
    """The state folder: ``state`` if given, else ``$POISONGUARD_STATE``, else ``.poisonguard``."""
    if state is not None:
        return Path(state)
    return Path(os.environ.get(STATE_ENV) or paths.STATE)


def log_path(state: Path | str | None = None) -> Path:
    return state_dir(state) / LOG_FILE


def actor() -> dict[str, str]:
    """Who is acting: the OS user, the host, and the flow or command (``$POISONGUARD_ACTOR`` if set)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = os.environ.get("USER", "unknown")
    flow = os.environ.get(ACTOR_ENV)
    if not flow:
        if os.environ.get("DVC_STAGE"):
            flow = f"dvc repro: {os.environ['DVC_STAGE']}"
        else:
            flow = " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]]).strip() if sys.argv else "python"
    return {"user": user, "host": socket.gethostname(), "flow": flow}


@contextlib.contextmanager
def acting_as(flow: str) -> Iterator[None]:
    """Entries written inside the block name ``flow`` as the actor (process-wide, so task threads see it)."""
    before = os.environ.get(ACTOR_ENV)
    os.environ[ACTOR_ENV] = flow
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ACTOR_ENV, None)
        else:
            os.environ[ACTOR_ENV] = before


def _canonical(entry: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 of the entry's canonical JSON without its ``hash`` key."""
    return hashlib.sha256(_canonical(entry)).hexdigest()


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    state.mkdir(parents=True, exist_ok=True)
    fh = open(state / LOCK_FILE, "a+b")  # noqa: SIM115 - held for the duration of the block
    try:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX: O_APPEND + fsync only
            pass
        yield
    finally:
        fh.close()  # closing the descriptor releases the lock


def _last_line(path: Path) -> bytes:
    """The last complete line of ``path`` (b"" for an empty or missing file)."""
    if not path.is_file():
        return b""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        block = 1 << 16
        pos = end
        buf = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            stripped = buf.rstrip(b"\n")
            if b"\n" in stripped:
                return stripped.rsplit(b"\n", 1)[1]
        return buf.rstrip(b"\n")


def _fsync_write(path: Path, data: bytes, *, append: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def record(action: str, *, subject: Mapping[str, Any] | None = None, reason: str = "",
           details: Mapping[str, Any] | None = None, state: Path | str | None = None,
           who: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Append one entry and return it (with its ``seq`` and ``hash``).

    Raises :class:`AuditError` when the log's tail is unreadable: a damaged log is never extended.
    """
    if not action or not isinstance(action, str):
        raise ValueError(f"audit action must be a non-empty string, got {action!r}")
    st = state_dir(state)
    log = st / LOG_FILE
    with _locked(st):
        last = _last_line(log)
        if last:
            try:
                prev = json.loads(last)
                seq, prev_hash = int(prev["seq"]) + 1, str(prev["hash"])
            except (ValueError, KeyError, TypeError) as e:
                raise AuditError(f"{log}: last entry is unreadable ({e}); run `poisonguard audit verify`") from e
        else:
            seq, prev_hash = 1, GENESIS
        entry: dict[str, Any] = {
            "seq": seq,
            "time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "actor": dict(who) if who else actor(),
            "action": action,
            "subject": dict(subject or {}),
            "reason": reason,
            "details": dict(details or {}),
            "prev_hash": prev_hash,
        }
        entry = json.loads(_canonical(entry))  # what is hashed is exactly what is stored
        entry["hash"] = entry_hash(entry)
        line = json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"
        _fsync_write(log, line.encode("utf-8"), append=True)
        tmp = st / (HEAD_FILE + ".tmp")
        _fsync_write(tmp, json.dumps({"seq": seq, "hash": entry["hash"]}).encode(), append=False)
        os.replace(tmp, st / HEAD_FILE)
    return entry


class AuditError(RuntimeError):
    """The audit log cannot be read or extended."""


def read(state: Path | str | None = None) -> list[dict[str, Any]]:
    """Every entry, in file order (no verification: use :func:`verify` for that)."""
    log = log_path(state)
    if not log.is_file():
        return []
    out = []
    for n, line in enumerate(log.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            raise AuditError(f"{log} line {n}: not JSON ({e}); run `poisonguard audit verify`") from e
    return out


def entries(action: str | None = None, state: Path | str | None = None, **subject: Any) -> list[dict[str, Any]]:
    """Entries with this action whose ``subject`` has these key/values."""
    return [e for e in read(state) if (action is None or e.get("action") == action)
            and all(e.get("subject", {}).get(k) == v for k, v in subject.items())]


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`: ``ok``, the entries checked, and every problem found."""

    path: str
    checked: int = 0
    head: dict[str, Any] | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_seq(self) -> int | None:
        return self.problems[0]["seq"] if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "path": self.path, "checked": self.checked, "first_bad_seq": self.first_bad_seq,
                "head": self.head, "problems": self.problems}


def verify(state: Path | str | None = None) -> VerifyResult:
    """Check the chain: every hash, every ``seq`` in order, every ``prev_hash`` link and the head.

    Problem kinds: ``unreadable`` (a line that is not JSON, e.g. a torn write), ``edited`` (the
    entry's hash does not match its content), ``missing`` (a ``seq`` gap: entries deleted),
    ``reordered`` (``seq`` goes backwards), ``broken_link`` (``prev_hash`` is not the previous
    entry's hash), ``truncated`` (the head names a later entry than the log's last).
    """
    st = state_dir(state)
    log = st / LOG_FILE
    res = VerifyResult(path=str(log))
    head_p = st / HEAD_FILE
    if head_p.is_file():
        try:
            res.head = json.loads(head_p.read_text())
        except ValueError:
            res.problems.append({"seq": 0, "line": 0, "kind": "unreadable", "detail": f"{head_p} is not JSON"})
    lines = log.read_bytes().split(b"\n") if log.is_file() else []
    if lines and lines[-1] == b"":
        lines.pop()
    expected_seq, prev_hash, last_seq = 1, GENESIS, 0
    for n, raw in enumerate(lines, 1):
        try:
            e = json.loads(raw)
            seq = int(e["seq"])
        except (ValueError, KeyError, TypeError) as err:
            res.problems.append({"seq": expected_seq, "line": n, "kind": "unreadable",
                                 "detail": f"line {n} is not an audit entry ({err})"})
            expected_seq += 1
            continue
        res.checked += 1
        if e.get("hash") != entry_hash(e):
            res.problems.append({"seq": seq, "line": n, "kind": "edited",
                                 "detail": f"entry {seq} ({e.get('action')}) does not match its hash"})
        if seq < expected_seq:
            res.problems.append({"seq": seq, "line": n, "kind": "reordered",
                                 "detail": f"line {n} holds entry {seq}, expected {expected_seq}"})
        elif seq > expected_seq:
            gap = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
            res.problems.append({"seq": expected_seq, "line": n, "kind": "missing",
                                 "detail": f"entries {gap} are missing before entry {seq} (deleted?)"})
        if e.get("prev_hash") != prev_hash:
            res.problems.append({"seq": seq, "line": n, "kind": "broken_link",
                                 "detail": f"entry {seq}: prev_hash does not match the hash of the entry before it"})
        expected_seq, prev_hash, last_seq = seq + 1, str(e.get("hash")), seq
    if res.head is not None:
        hseq = int(res.head.get("seq", 0))
        if hseq > last_seq:
            res.problems.append({"seq": last_seq + 1, "line": len(lines) + 1, "kind": "truncated",
                                 "detail": f"the head names entry {hseq} but the log ends at entry {last_seq}"})
        elif hseq == last_seq and res.head.get("hash") != prev_hash and last_seq:
            res.problems.append({"seq": last_seq, "line": len(lines), "kind": "edited",
                                 "detail": f"entry {last_seq} differs from the one recorded in {HEAD_FILE}"})
    res.problems.sort(key=lambda p: (p["seq"], p["line"]))
    return res
