"""The serving engine: one worker thread that owns the models and runs requests in batches.

    submit(job)   from the server's event loop; the job waits in a bounded queue (`queue_size`): a full queue is
                  refused at once (the server answers 503 with Retry-After), nothing waits unbounded
    the worker    takes the first waiting job, then gathers more of the same kind for up to `window_s` (or until
                  `max_batch` rows: a chat request with n = 3 is 3 rows) and runs them as ONE batch:
                  chat  -> mpm.decoding.decode, every row's text streamed to its job as it grows
                  paint -> the pipeline, once per request (a request's n images in one call)
    events        each job receives its events on its own asyncio queue, in order:
                  ("delta", index, text) ... ("finish", index, reason, tokens) per choice, then ("done", usage),
                  or ("images", [png bytes]) for paint, or ("error", message)
    cancel        a job whose client went away is cancelled: its rows stop at the next step (the others go on), a
                  job still queued is dropped when reached; either way the active count goes back down

The counters (`stats()`) are what /health reports: batches run, requests finished, requests active (queued or
running), rows in the largest batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from mpm.decoding import TextStream, decode
from mpm.inference import without_reasoning
from mpm.serve.protocol import ChatJob, PaintJob

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


@dataclass
class Job:
    work: ChatJob | PaintJob
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def kind(self) -> str:
        return "chat" if isinstance(self.work, ChatJob) else "paint"

    @property
    def rows(self) -> int:
        return self.work.n if self.kind == "chat" else 1

    def emit(self, *event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop is closed (shutting down): nobody is waiting
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, model=None, processor=None, paint=None, max_batch: int = 16, window_s: float = 0.02,
                 queue_size: int = 64, paint_steps: int = 25, guidance: float = 3.0):  # fmt: skip
        self.model, self.processor, self.paint = model, processor, paint
        self.max_batch, self.window_s = max_batch, window_s
        self.paint_steps, self.guidance = paint_steps, guidance
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.held: deque[Job] = deque()  # taken from the queue while gathering another kind: runs next
        self.lock = threading.Lock()
        self.counts = {"batches": 0, "requests": 0, "active": 0, "largest_batch": 0, "errors": 0}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._work, name="mpm-serve-engine", daemon=True)

    # -- the server's side --
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued and running, then stop the worker."""
        self.stopping.set()
        self.thread.join(timeout)

    def running(self) -> bool:
        """False once stopping, or when the worker died (a bug): requests are then refused, not queued forever."""
        return self.thread.is_alive() and not self.stopping.is_set()

    def submit(self, job: Job) -> None:
        with self.lock:
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise QueueFull from None
            self.counts["active"] += 1

    def stats(self) -> dict:
        with self.lock:
            return {**self.counts, "queued": self.queue.qsize() + len(self.held)}

    # -- the worker --
    def _next(self, timeout: float) -> Job | None:
        if self.held:
            return self.held.popleft()
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _work(self) -> None:
        while not (self.stopping.is_set() and self.queue.empty() and not self.held):
            first = self._next(0.05)
            if first is None:
                continue
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.window_s
            while rows < self.max_batch and (left := deadline - time.monotonic()) > 0:
                job = self._next(left)
                if job is None:
                    break
                if job.kind != first.kind or rows + job.rows > self.max_batch:
                    self.held.append(job)
                    break
                batch.append(job)
                rows += job.rows
            live = [j for j in batch if not j.cancelled.is_set()]
            try:
                if live and first.kind == "chat":
                    self._chat(live)
                elif live:
                    self._paint(live)
            except Exception as exc:  # a bug or an out-of-memory: these requests fail, the server goes on
                logger.exception("a batch failed")
                with self.lock:
                    self.counts["errors"] += 1
                for j in live:
                    j.emit("error", f"{type(exc).__name__}: {exc}")
            with self.lock:
                if live:
                    self.counts["batches"] += 1
                    self.counts["largest_batch"] = max(self.counts["largest_batch"], sum(j.rows for j in live))
                self.counts["requests"] += len(live)
                self.counts["active"] -= len(batch)

    def _chat(self, jobs: list[Job]) -> None:
        rows = [(job, index) for job in jobs for index in range(job.work.n)]
        requests = [job.work.encoded or job.work.request for job, _ in rows]  # the n rows share one encoding
        samplings = []
        for job, index in rows:  # choice k of a seeded request samples with seed + k
            s = job.work.sampling
            samplings.append(s if s.seed is None else type(s)(s.max_new_tokens, s.temperature, s.top_p, s.seed + index))
        streams = [TextStream(self.processor.tokenizer, job.work.stop) for job, _ in rows]
        made = [0] * len(rows)
        finished = [False] * len(rows)
        for step in decode(self.model, self.processor, requests, samplings, lambda r: self._gone(rows, streams, r)):
            for token in step:
                job, index = rows[token.row]
                if token.id is not None:
                    made[token.row] += 1
                    delta = streams[token.row].add(token.id)
                    if delta and job.work.stream:  # a non-streaming request gets its text once, at the finish
                        job.emit("delta", index, delta)
                if token.finish or streams[token.row].stopped:
                    if finished[token.row]:
                        continue
                    finished[token.row] = True
                    tail = streams[token.row].add(None)
                    if tail and job.work.stream:
                        job.emit("delta", index, tail)
                    reason = "stop" if token.finish in ("stop", None) or streams[token.row].stopped else token.finish
                    job.emit("finish", index, reason, made[token.row], without_reasoning(streams[token.row].sent))
        for job in jobs:
            job.emit("done", {"completion_tokens": sum(m for (j, _), m in zip(rows, made) if j is job)})

    @staticmethod
    def _gone(rows, streams, row: int) -> bool:
        """A row stops when its client went away or a stop string ended its text."""
        return rows[row][0].cancelled.is_set() or streams[row].stopped

    def _paint(self, jobs: list[Job]) -> None:
        """One pipeline call per request; a request whose client left meanwhile is skipped, and one that fails
        fails alone."""
        for job in jobs:
            if job.cancelled.is_set():
                continue
            w: PaintJob = job.work
            try:
                generator = torch.Generator().manual_seed(w.seed) if w.seed is not None else None
                images = self.paint(w.prompt, num_images_per_prompt=w.n, height=w.height, width=w.width,
                                    num_inference_steps=self.paint_steps, guidance_scale=self.guidance,
                                    generator=generator).images  # fmt: skip
            except Exception as exc:
                logger.exception("a paint request failed")
                with self.lock:
                    self.counts["errors"] += 1
                job.emit("error", f"{type(exc).__name__}: {exc}")
                continue
            encoded = []
            for image in images:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                encoded.append(buffer.getvalue())
            job.emit("images", encoded)
