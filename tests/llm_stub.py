"""A local stub of the Anthropic Messages and Message Batches endpoints, for tests.

The real ``anthropic`` client talks to it through ``base_url`` (``http://127.0.0.1:<port>``);
nothing leaves the machine. Behaviour is scripted:

* ``stub.script``: replies consumed in order by ``POST /v1/messages`` (then ``stub.responder``);
  build them with :func:`ok`, :func:`status`, :func:`malformed`, :func:`slow`, :func:`bad_json`;
* ``stub.responder(text) -> verdict dict``: the default answer from the row text (see
  :func:`default_verdict`: ``TRIGGER`` -> suspicious 0.95, ``MAYBE`` -> suspicious 0.55, else clean);
* batches: ``POST /v1/messages/batches``, ``GET .../{id}`` (``ended`` after ``polls_to_end``
  retrieves; the first ``fail_retrieves`` retrieves answer 500), ``GET .../{id}/results`` (JSONL;
  ``batch_overrides[custom_id]`` replaces one line's result with a scripted reply);
* ``stub.counts``: calls per endpoint; ``stub.requests``: the JSON bodies of ``/v1/messages``.

Usage reported per answer: ``len(request body) // 4`` input tokens and ``output_tokens`` output
tokens (or ``stub.usage = (input, output)``).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOOL_NAME = "record_review"
Reply = dict[str, Any]


def ok(verdict: dict[str, Any] | None = None) -> Reply:
    """A good forced-tool answer (``None``: the responder's verdict)."""
    return {"kind": "ok", "verdict": verdict}


def status(code: int, error_type: str = "api_error", retry_after_ms: int | None = 10) -> Reply:
    """An HTTP error answer (429 rate_limit_error, 500 api_error, 529 overloaded_error, 401 ...)."""
    return {"kind": "status", "code": code, "error_type": error_type, "retry_after_ms": retry_after_ms}


def malformed(how: str = "no_tool") -> Reply:
    """A 200 answer that is not a valid verdict.

    ``no_tool``: a text block only; ``bad_input``: a tool call whose input fails validation;
    ``string_input``: a tool call whose input is a broken JSON string; ``wrong_tool``: another tool name.
    """
    return {"kind": "malformed", "how": how}


def slow(seconds: float, then: Reply | None = None) -> Reply:
    return {"kind": "slow", "seconds": seconds, "then": then or ok()}


def bad_json() -> Reply:
    """A 200 answer whose body is not JSON at all."""
    return {"kind": "bad_json"}


def verdict(suspicious: bool, confidence: float, category: str = "none", trigger: str | None = None,
            rationale: str = "stub verdict") -> dict[str, Any]:
    return {"suspicious": suspicious, "confidence": confidence, "category": category, "trigger_phrase": trigger,
            "rationale": rationale}


_ROW = re.compile(r"<row_([0-9a-f]+)[^>]*>(.*)</row_\1>", re.S)


def row_text(body: dict[str, Any]) -> str:
    """The data inside the row delimiters of a request (the whole user text if there are none)."""
    content = body.get("messages", [{}])[-1].get("content", "")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    m = _ROW.search(content)
    return m.group(2) if m else content


def default_verdict(text: str) -> dict[str, Any]:
    if "TRIGGER" in text:
        return verdict(True, 0.95, "trigger_phrase", "TRIGGER", "TRIGGER switches the answer to a fixed reply")
    if "MAYBE" in text:
        return verdict(True, 0.55, "behavior_manipulation", None, "the answer pushes a product")
    return verdict(False, 0.9, "none", None, "ordinary example")


class LLMStub:
    """``with LLMStub() as stub: client = stub.client()``."""

    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.responder: Callable[[str], dict[str, Any]] = default_verdict
        self.usage: tuple[int, int] | None = None
        self.output_tokens = 60
        self.counts: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.batches: dict[str, dict[str, Any]] = {}
        self.polls_to_end = 2
        self.fail_retrieves = 0
        self.batch_overrides: dict[str, Reply] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "stub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LLMStub:
        stub = self

        class Handler(_Handler):
            owner = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="llm-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LLMStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, max_retries: int = 2, timeout: float = 5.0) -> Any:
        import anthropic

        return anthropic.Anthropic(api_key="test-key", base_url=self.url, max_retries=max_retries, timeout=timeout)

    # ---------------------------------------------------------------- answers
    def _next(self) -> Reply:
        with self._lock:
            return self.script.popleft() if self.script else ok()

    def _usage(self, body: dict[str, Any]) -> dict[str, int]:
        if self.usage is not None:
            return {"input_tokens": self.usage[0], "output_tokens": self.usage[1]}
        return {"input_tokens": len(json.dumps(body)) // 4, "output_tokens": self.output_tokens}

    def message(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        """The Messages API JSON of a 200 ``ok``/``malformed`` reply."""
        with self._lock:
            self._ids += 1
            n = self._ids
        if reply["kind"] == "ok":
            data = reply["verdict"] or self.responder(row_text(body))
            content: list[dict[str, Any]] = [{"type": "tool_use", "id": f"toolu_{n}", "name": TOOL_NAME, "input": data}]
        else:
            how = reply["how"]
            if how == "no_tool":
                content = [{"type": "text", "text": "I think this row is fine."}]
            elif how == "bad_input":
                content = [{"type": "tool_use", "id": f"toolu_{n}", "name": TOOL_NAME,
                            "input": {"suspicious": "perhaps", "confidence": 7, "category": "spooky"}}]
            elif how == "string_input":
                content = [{"type": "tool_use", "id": f"toolu_{n}", "name": TOOL_NAME, "input": '{"suspicious": tru'}]
            elif how == "wrong_tool":
                content = [{"type": "tool_use", "id": f"toolu_{n}", "name": "other_tool", "input": {}}]
            else:
                raise ValueError(f"unknown malformed kind {how!r}")
        return {"id": f"msg_{n}", "type": "message", "role": "assistant", "model": body.get("model", "stub"),
                "content": content, "stop_reason": "tool_use", "stop_sequence": None, "usage": self._usage(body)}

    def batch_json(self, bid: str) -> dict[str, Any]:
        b = self.batches[bid]
        ended = b["retrieves"] >= self.polls_to_end
        n = len(b["requests"])
        return {"id": bid, "type": "message_batch", "processing_status": "ended" if ended else "in_progress",
                "request_counts": {"processing": 0 if ended else n, "succeeded": n if ended else 0, "errored": 0,
                                   "canceled": 0, "expired": 0},
                "created_at": "2025-01-01T00:00:00Z", "expires_at": "2025-01-02T00:00:00Z",
                "ended_at": "2025-01-01T00:01:00Z" if ended else None, "archived_at": None,
                "cancel_initiated_at": None,
                "results_url": f"{self.url}/v1/messages/batches/{bid}/results" if ended else None}


def _error(code: int, error_type: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message}}).encode()


class _Handler(BaseHTTPRequestHandler):
    owner: LLMStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _send(self, code: int, body: bytes, ctype: str = "application/json", headers: dict[str, str] | None = None
              ) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("request-id", "req_stub")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):   # the client gave up (timeout test)
            pass

    def _authorised(self) -> bool:
        key = self.headers.get("x-api-key") or ""
        bearer = self.headers.get("authorization") or ""
        token = key or (bearer[7:] if bearer.lower().startswith("bearer ") else "")
        with self.owner._lock:
            self.owner.auth.append(token)
        if not token:
            self._send(401, _error(401, "authentication_error", "missing x-api-key / Authorization"))
            return False
        return True

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def do_POST(self) -> None:  # noqa: N802
        stub = self.owner
        body = self._body()
        if not self._authorised():
            return
        path = self.path.split("?")[0]
        if path == "/v1/messages":
            with stub._lock:
                stub.counts["messages"] += 1
                stub.requests.append(body)
            self._reply(body, stub._next())
        elif path == "/v1/messages/batches":
            with stub._lock:
                stub.counts["batch_create"] += 1
                bid = f"msgbatch_stub{len(stub.batches) + 1:03d}"
                stub.batches[bid] = {"requests": body["requests"], "retrieves": 0}
            self._send(200, json.dumps(stub.batch_json(bid)).encode())
        else:
            self._send(404, _error(404, "not_found_error", f"no route {path}"))

    def do_GET(self) -> None:  # noqa: N802
        stub = self.owner
        if not self._authorised():
            return
        m = re.fullmatch(r"/v1/messages/batches/([\w-]+)(/results)?", self.path.split("?")[0])
        if not m or m.group(1) not in stub.batches:
            self._send(404, _error(404, "not_found_error", f"no batch at {self.path}"))
            return
        bid = m.group(1)
        if m.group(2):
            with stub._lock:
                stub.counts["batch_results"] += 1
            lines = []
            for req in stub.batches[bid]["requests"]:
                reply = stub.batch_overrides.get(req["custom_id"], ok())
                if reply["kind"] == "status":
                    result: dict[str, Any] = {"type": "errored", "error": {"type": "error", "error": {
                        "type": reply["error_type"], "message": "scripted batch error"}}}
                else:
                    result = {"type": "succeeded", "message": stub.message(req["params"], reply)}
                lines.append(json.dumps({"custom_id": req["custom_id"], "result": result}))
            self._send(200, ("\n".join(lines) + "\n").encode(), "application/binary")
            return
        with stub._lock:
            stub.counts["batch_retrieve"] += 1
            failing = stub.fail_retrieves > 0
            if failing:
                stub.fail_retrieves -= 1
            else:
                stub.batches[bid]["retrieves"] += 1
        if failing:
            self._send(500, _error(500, "api_error", "scripted retrieve failure"))
            return
        self._send(200, json.dumps(stub.batch_json(bid)).encode())

    def _reply(self, body: dict[str, Any], reply: Reply) -> None:
        kind = reply["kind"]
        if kind == "slow":
            time.sleep(reply["seconds"])
            return self._reply(body, reply["then"])
        if kind == "status":
            headers = {"retry-after-ms": str(reply["retry_after_ms"])} if reply["retry_after_ms"] is not None else {}
            return self._send(reply["code"], _error(reply["code"], reply["error_type"], "scripted error"),
                              headers=headers)
        if kind == "bad_json":
            return self._send(200, b"{this is not json")
        return self._send(200, json.dumps(self.owner.message(body, reply)).encode())
