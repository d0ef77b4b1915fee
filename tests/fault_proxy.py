"""A fault-injecting HTTP proxy in front of an OpenAI-compatible server (test code).

    proxy = FaultProxy(upstream="http://127.0.0.1:8000", fault_rate=0.2, seed=0).start()
    client = OpenAIClient(proxy.base_url, "tiny", ...)    # proxy.base_url ends in /v1
    ...; proxy.stop(); proxy.injected  # {"429": n, "500": n, "slow": n, "malformed": n, "reset": n}

Runs its own event loop in a thread, so a CLI subprocess or a test's loop can
talk to it. The fault of the n-th request (arrival order) is drawn up front
from ``random.Random(seed)``: about ``fault_rate`` of the requests get one of
``kinds`` (429 with Retry-After, 500, a reply slower than the client's timeout,
a 200 with a malformed JSON body, a reset connection); the rest are forwarded.
``upstream=None`` answers itself (a tiny fake server: a judge verdict, usage
counts), for fast unit tests. Raw asyncio HTTP/1.1 with keep-alive: a reset
really is a TCP reset (``transport.abort()``).

An outage (``down_after=K, down_s=S``): the K-th chat request takes the server
down for S seconds the way a crashed server is down: the listening socket
closes (new connections are refused), every open connection is reset, and it
listens again on the same port afterwards; ``outages`` holds the (start, end)
wall times.
"""
from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from typing import Any

KINDS = ("429", "500", "slow", "malformed", "reset")


class FaultProxy:
    def __init__(self, upstream: str | None = None, fault_rate: float = 0.2, seed: int = 0,
                 kinds: tuple[str, ...] = KINDS, retry_after: str = "0.05", slow_s: float = 1.0,
                 schedule: list[str | None] | None = None, reply_delay_s: float = 0.0,
                 reject_response_format: bool = False, down_after: int | None = None, down_s: float = 0.0):
        self.upstream, self.retry_after, self.slow_s, self.reply_delay_s = upstream, retry_after, slow_s, reply_delay_s
        self.reject_response_format = reject_response_format  # play a server without structured output
        rng = random.Random(seed)
        self.schedule = schedule if schedule is not None else [
            kinds[rng.randrange(len(kinds))] if rng.random() < fault_rate else None for _ in range(100_000)]
        self.injected = dict.fromkeys(kinds if schedule is None else set(k for k in schedule if k), 0)
        self.requests = 0  # requests seen (faulty ones included)
        self.forwarded = 0
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0
        self.port = 0
        self.down_after, self.down_s = down_after, down_s
        self.outages: list[tuple[float, float]] = []
        self.reset_by_outage = 0  # connections reset when the server went down
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FaultProxy":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _go_down(self) -> None:
        start = time.time()
        self._server.close()  # new connections: refused
        for writer in list(self._writers):  # open ones: reset
            self.reset_by_outage += 1
            writer.transport.abort()
        await asyncio.sleep(self.down_s)
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.outages.append((start, time.time()))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                if not await self._serve(request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client gave up (its timeout), or the proxy stops: nothing to answer
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, request: tuple[str, str, bytes], writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must end."""
        method, path, body = request
        n = self.requests
        self.requests += 1
        fault = self.schedule[n % len(self.schedule)] if path.endswith("/chat/completions") else None
        if self.down_after is not None and n == self.down_after:
            asyncio.get_running_loop().create_task(self._go_down())  # resets this connection too
            return False
        if fault:
            self.injected[fault] += 1
        if fault == "reset":
            writer.transport.abort()
            return False
        if fault == "429":
            _write(writer, 429, b'{"error": {"message": "rate limited"}}', {"Retry-After": self.retry_after})
        elif fault == "500":
            _write(writer, 500, b'{"error": {"message": "injected"}}')
        elif fault == "malformed":
            _write(writer, 200, b'{"id": "x", "choices": [{"message": {"content": "tru')
        elif fault == "slow":
            await asyncio.sleep(self.slow_s)
            _write(writer, 200, _fake_reply(json.loads(body or b"{}")))
        else:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                status, data = await self._answer(method, path, body)
            finally:
                self.in_flight -= 1
            _write(writer, status, data)
        await writer.drain()
        return True

    async def _answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        self.forwarded += 1
        if body:
            self.bodies.append(json.loads(body))
            if self.reject_response_format and "response_format" in self.bodies[-1]:
                return 400, b'{"error": {"message": "response_format is not supported"}}'
        if self.upstream is None:
            await asyncio.sleep(self.reply_delay_s)
            return 200, _fake_reply(self.bodies[-1] if body else {})
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.request(method, self.upstream + path, data=body,
                                       headers={"Content-Type": "application/json"}) as resp:
                return resp.status, await resp.read()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    if not head:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    length = int(headers.get("content-length", "0"))
    return method, path, await reader.readexactly(length) if length else b""


def _write(writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json", f"Content-Length: {len(body)}",
             "Connection: keep-alive", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def _fake_reply(request: dict[str, Any]) -> bytes:
    """A judge-shaped answer: the verdict key of the requested schema (or criteria_met), true."""
    schema = (request.get("response_format") or {}).get("json_schema", {}).get("schema", {})
    key = next((k for k in schema.get("required", []) if k != "explanation"), "criteria_met")
    content = json.dumps({"explanation": "fake judge", key: True})
    prompt_chars = sum(len(m.get("content", "")) for m in request.get("messages", []))
    return json.dumps({"id": "fake", "object": "chat.completion", "created": 0, "model": request.get("model", "m"),
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": 7,
                                 "total_tokens": prompt_chars // 4 + 7}}).encode()
