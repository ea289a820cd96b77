"""poisonguard selects the system allocator for Arrow (freed buffers go back to the OS at a heap
trim) unless the user chose a pool."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = ("import poisonguard, pyarrow as pa; from poisonguard import textfeat; textfeat.trim_heap(); "
        "print(pa.default_memory_pool().backend_name)")


def _pool(env_pool: str | None, first: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if env_pool:
        env["ARROW_DEFAULT_MEMORY_POOL"] = env_pool
    out = subprocess.run([sys.executable, "-c", first + CODE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_system_allocator_by_default_the_users_choice_otherwise():
    assert _pool(None) == "system"
    assert _pool("mimalloc") == "mimalloc"
    # pyarrow loaded before poisonguard: the pool is switched at import
    assert _pool(None, first="import pyarrow; ") == "system"
