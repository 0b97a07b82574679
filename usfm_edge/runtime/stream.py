"""Pipelined inference over a sequence of frames (cine loops, folders, live sources); results in input order.

``Engine.stream(frames)`` returns the generator made here. Three things run at once::

    loader thread     next frames: read file / decode DICOM -> check -> copy -> fit/preprocess (Engine.prepare) -> submit
    backend           inference of up to ``depth`` frames (OpenVINO: AsyncInferQueue requests; ORT: a worker thread)
    caller's thread   post-processing (bare bundles), typed result, and whatever the caller does with it

* OpenVINO: an ``openvino.AsyncInferQueue`` of ``depth`` infer requests on the engine's compiled model; the
  next request is queued while one runs, and its callback copies the outputs out of the request.
* ONNX Runtime (CPU): one worker thread calls ``session.run`` (ORT already spreads one run over every core;
  two concurrent runs would only fight for them) while the loader prepares the next frames and the caller
  handles the previous result; with a GPU provider, 2 workers overlap one frame's transfers with another's
  compute. The engine's streams share the worker (CPU inference is serialised; ``predict`` from other
  threads still runs concurrently).
  I/O binding brings nothing on CPU (ORT reads the numpy buffer in place), so it is not used.
* TensorRT: one worker thread (the backend serialises its execution context).

A frame is copied as it is taken from the iterable, so sources that reuse one buffer (camera grabbers) are safe.
Memory stays bounded: at most ``depth`` frames are queued and ``depth + 2`` are in flight. The worker threads,
the loader threads (up to 32 concurrent streams per engine) and the OpenVINO queue are kept by the engine
between streams and released by ``Engine.close`` (which also ends streams still running).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import BundleError, ConfigError, DataError, InputError

__all__ = ["stream_results"]

_END = object()
_POLL_S = 0.2  # how often a waiting thread checks for "stop"
_STALL_S = 5.0  # a frame's inference pending this long: ask OpenVINO whether its request failed
_MAX_STREAMS = 32  # concurrent streams per engine (each holds one loader thread while it runs)


class _PoolSubmitter:
    """Inference on worker threads calling the backend's (thread-safe) ``run``; shared by an engine's streams."""

    def __init__(self, backend, workers: int):
        self._run = backend.run
        self._pool = ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="usfm-infer")

    def _timed(self, x: np.ndarray):
        t0 = time.perf_counter()
        out = self._run(x)
        return out, (time.perf_counter() - t0) * 1000.0

    def submit(self, x: np.ndarray) -> Future:
        return self._pool.submit(self._timed, x)

    def check(self, fut: Future) -> None:
        """Nothing to do: a failed ``run`` sets its future's exception."""

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _OpenVINOSubmitter:
    """Inference on an ``openvino.AsyncInferQueue`` shared by an engine's streams; each frame's future is
    completed by the queue's callback, so frames of concurrent streams never mix."""

    def __init__(self, backend, jobs: int):
        import openvino as ov

        self._names, self._ports = list(backend.output_names), list(backend._ports)
        self._queue = ov.AsyncInferQueue(backend.compiled, int(jobs))
        self._queue.set_callback(self._done)
        self._closed = False

    def _done(self, request, fut: Future) -> None:
        try:
            outs = {n: np.array(request.get_tensor(p).data, copy=True) for n, p in zip(self._names, self._ports)}
            fut.set_result((outs, float(request.latency)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            if not fut.done():
                fut.set_exception(exc)

    def submit(self, x: np.ndarray) -> Future:
        fut: Future = Future()
        if self._closed:  # a loader thread that outlived Engine.close: nothing more runs
            fut.set_exception(BundleError("engine was closed"))
            return fut
        fut.set_running_or_notify_cancel()
        self._queue.start_async({0: x}, fut, share_inputs=False)  # copied into the request's own tensor
        return fut

    def check(self, fut: Future) -> None:
        """A request that failed may never call back: OpenVINO raises its error on ``wait_all`` instead."""
        try:
            self._queue.wait_all()
            err: BaseException = RuntimeError("OpenVINO finished the request without calling back")
        except Exception as exc:  # noqa: BLE001 - OpenVINO's RuntimeError
            err = exc
        if not fut.done():
            try:
                fut.set_exception(err)
            except InvalidStateError:  # the callback won the race
                pass

    def shutdown(self) -> None:
        self._closed = True
        try:
            self._queue.wait_all()
        except Exception:  # noqa: BLE001 - already reported through a future
            pass


class _Shared:
    """Threads and queues an engine keeps between streams (re-creating them per stream costs time and, with
    glibc's per-thread malloc arenas, resident memory); released by ``Engine.close``."""

    def __init__(self, loaders: ThreadPoolExecutor, submitter):
        self.loaders, self.submitter = loaders, submitter
        self.stops: set[threading.Event] = set()  # one per running stream

    def shutdown(self) -> None:
        for stop in list(self.stops):  # running streams end with BundleError("engine was closed")
            stop.set()
        self.loaders.shutdown(wait=False, cancel_futures=True)
        self.submitter.shutdown()


def _shared(engine, depth: int) -> _Shared:
    backend = engine.backend
    if backend is None:
        raise BundleError("engine is closed", path=engine.folder)
    key = ("stream", depth if backend.name == "openvino" else 0)
    with engine._shared_lock:
        shared = engine._shared.get(key)
        if shared is None:
            if backend.name == "openvino":
                sub = _OpenVINOSubmitter(backend, depth)
            else:
                gpu = backend.name == "onnxruntime" and "CPU" not in str(backend.device)
                sub = _PoolSubmitter(backend, 2 if gpu else 1)
            loaders = ThreadPoolExecutor(_MAX_STREAMS, thread_name_prefix="usfm-stream-loader")
            shared = engine._shared[key] = _Shared(loaders, sub)
    return shared


def default_depth(engine) -> int:
    """Frames in flight: 2, or OpenVINO's optimal number of infer requests when larger."""
    backend = engine.backend
    if backend is not None and backend.name == "openvino":
        try:
            return max(2, int(backend.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        except Exception:  # noqa: BLE001 - property missing on some devices
            return 2
    return 2


def _split(item, spacing):
    """An item of the iterable -> (frame or path, spacing); ``(frame, spacing)`` pairs carry their own spacing."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (np.ndarray, str, Path)):
        return item[0], item[1] if item[1] is not None else spacing
    return item, spacing


def _put(q: queue.Queue, entry, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(entry, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _loader(engine, frames: Iterable, spacing, sub, q: queue.Queue, stop: threading.Event, submitted: set):
    """Runs in a loader thread: read, check, copy, prepare and submit each frame, then queue its future."""
    try:
        for i, item in enumerate(frames):
            if stop.is_set():
                return
            raw, sp = _split(item, spacing)
            try:
                gray, sp = engine.load(raw, sp)
                if isinstance(raw, np.ndarray) and np.may_share_memory(gray, raw):
                    gray = gray.copy()  # the source may reuse its buffer for the next frame
                t0 = time.perf_counter()
                x = engine.prepare([gray])
                prep_ms = (time.perf_counter() - t0) * 1000.0
            except (InputError, DataError) as exc:
                entry = (i, None, None, 0.0, type(exc)(f"frame {i}: {exc.message}", path=exc.path, hint=exc.hint))
            else:
                fut = sub.submit(x)
                submitted.add(fut)  # until the caller has its result: what to wait for if it stops early
                entry = (i, gray.shape, sp, prep_ms, fut)
            if not _put(q, entry, stop):
                return
    except BaseException as exc:  # noqa: BLE001 - the iterable or the backend failed: end the stream with it
        _put(q, ("fatal", exc), stop)
    finally:
        _put(q, _END, stop)


def _get(q: queue.Queue, stop: threading.Event, engine):
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if stop.is_set():
                raise BundleError("the engine was closed during the stream", path=engine.folder) from None


def _wait(fut: Future, sub, engine):
    while True:
        try:
            return fut.result(timeout=_STALL_S)
        except FutureTimeout:
            sub.check(fut)
        except CancelledError:
            raise BundleError("the engine was closed during the stream", path=engine.folder) from None


def stream_results(engine, frames: Iterable, pixel_spacing_mm=None, *, depth: int | None = None,
                   on_error: str = "raise") -> Iterator:
    """Generator behind :meth:`Engine.stream` (see there and the module docstring).

    Args:
        engine: an open ``Engine``.
        frames: iterable of arrays, paths or ``(frame, pixel_spacing_mm)`` pairs.
        pixel_spacing_mm: spacing for frames without their own.
        depth: frames in flight (None = :func:`default_depth`).
        on_error: ``raise`` or ``yield`` (bad frames become their ``InputError``/``DataError`` in the output).

    Yields:
        results (or errors, with ``on_error="yield"``) in input order; ``timing_ms`` of a streamed result is
        the frame's own preprocessing + inference + post-processing time (as in ``predict``), without the
        time it waited in the pipeline.

    Raises:
        ConfigError: bad ``depth`` or ``on_error``.
        InputError, DataError: a bad frame with ``on_error="raise"`` (after the results before it).
    """
    if on_error not in ("raise", "yield"):
        raise ConfigError(f"on_error must be 'raise' or 'yield', got {on_error!r}")
    if depth is not None and int(depth) < 1:
        raise ConfigError(f"depth must be at least 1, got {depth}")
    depth = int(depth) if depth is not None else default_depth(engine)
    return _generate(engine, frames, pixel_spacing_mm, depth, on_error)


def _generate(engine, frames, spacing, depth: int, on_error: str) -> Iterator:
    from usfm_edge.runtime.results import pixel_spacing

    spacing = pixel_spacing(spacing)
    shared = _shared(engine, depth)
    sub = shared.submitter
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, submitted = threading.Event(), set()
    shared.stops.add(stop)
    loader = shared.loaders.submit(_loader, engine, frames, spacing, sub, q, stop, submitted)
    try:
        while True:
            entry = _get(q, stop, engine)
            if entry is _END:
                return
            if entry[0] == "fatal":
                raise entry[1]
            _, hw, sp, prep_ms, payload = entry
            if isinstance(payload, Exception):
                if on_error == "raise":
                    raise payload
                yield payload
                continue
            outs, infer_ms = _wait(payload, sub, engine)
            submitted.discard(payload)
            t0 = time.perf_counter()
            final = engine._finish(outs, hw)
            ms = prep_ms + infer_ms + (time.perf_counter() - t0) * 1000.0
            yield engine._result({k: v[0] for k, v in final.items()}, sp, ms)
    finally:
        stop.set()
        while True:  # unblock the loader
            try:
                q.get_nowait()
            except queue.Empty:
                break
        wait([loader], timeout=5.0)
        pending = list(submitted)
        for fut in pending:
            fut.cancel()
        wait(pending, timeout=60.0)  # leave no inference of this stream running behind the caller
        shared.stops.discard(stop)
