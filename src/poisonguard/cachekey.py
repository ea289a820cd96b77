"""Content-addressed cache keys for pipeline stages (used by the Prefect tasks).

A key is the SHA-256 of: the stage name, the content of every input file (folders are walked
in sorted order), the stage's params (canonical JSON) and the library's code version. When any
declared output is missing the key is ``None``, which makes the orchestrator run the stage
rather than return a summary whose files are gone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from poisonguard import code_version

_CHUNK = 1 << 20


def hash_path(path: Path, h: Any) -> None:
    path = Path(path)
    if path.is_dir():
        for p in sorted(x for x in path.rglob("*") if x.is_file()):
            h.update(p.relative_to(path).as_posix().encode())
            hash_path(p, h)
    elif path.is_file():
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    else:
        h.update(b"<missing>")


def stage_key(stage: str, inputs: Iterable[Path | str], params: Any, outputs: Iterable[Path | str] = ()
              ) -> str | None:
    if any(not Path(o).exists() for o in outputs):
        return None
    h = hashlib.sha256()
    h.update(stage.encode())
    h.update(code_version().encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    for p in inputs:
        h.update(str(p).encode())
        hash_path(Path(p), h)
    return f"{stage}-{h.hexdigest()}"
