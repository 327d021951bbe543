"""The pipe between the grader (trusted) and a submission's worker process (untrusted).

Messages are framed: 8 bytes of length, then the payload. The two directions use different formats,
because only one of them is trusted:

- grader -> worker: :mod:`pickle`, so that the checks can hand over what they hold (tensors, a model,
  a batch; the worker unpickles data that the grader made, which is safe *for the worker*), with
  :class:`Ref` standing in for an object that lives in the worker;
- worker -> grader: :func:`torch.save` of plain data only (``None``, bools, numbers, strings,
  tensors, and lists, tuples and dicts of these), read with ``torch.load(weights_only=True)``,
  which builds nothing but those types. Anything else the student's code returns (a class, an
  instance, a closure) stays in the worker; the grader receives a reference to it, a tuple
  ``(REF, id, type name, callable)``, and calls its methods over the pipe.

This module must import nothing of the checks: the worker imports it.
"""

from __future__ import annotations

import io
import os
import pickle
import struct

import torch

HEADER = struct.Struct("<Q")
REF = "__icl_course_remote__"  # first item of the tuple that stands for an object kept in the worker
MAX_MESSAGE = 64 * 2**20  # bytes: a longer message ends the conversation (the submission's result is refused)
MAX_ELEMENTS = 8_000_000  # tensor entries in one reply, summed
MESSAGE = 500  # characters of an exception's message that cross


class ProtocolError(Exception):
    """The other side sent something that is not a message (too long, cut short, malformed)."""


class Ref:
    """An object kept in the worker, as the grader names it when it sends it back."""

    __slots__ = ("id",)

    def __init__(self, id: int):
        self.id = int(id)

    def __reduce__(self):
        return (Ref, (self.id,))


# --- framing ---------------------------------------------------------------------------------------


def send_bytes(fd: int, payload: bytes) -> None:
    data = HEADER.pack(len(payload)) + payload
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_exactly(fd: int, n: int, wait=None) -> bytes:
    """``n`` bytes from ``fd``; ``wait(fd)`` (if given) blocks until it is readable or raises."""
    chunks, left = [], n
    while left:
        if wait is not None:
            wait(fd)
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise ProtocolError("the other side closed the pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_bytes(fd: int, wait=None, limit: int = MAX_MESSAGE) -> bytes:
    (length,) = HEADER.unpack(read_exactly(fd, HEADER.size, wait))
    if length > limit:
        raise ProtocolError(f"a message of {length} bytes (the limit is {limit})")
    return read_exactly(fd, length, wait)


# --- worker -> grader: plain data only ---------------------------------------------------------------


def encode_value(value, keep) -> object:
    """``value`` as plain data; ``keep(obj) -> id`` stores anything else in the worker and names it."""
    def walk(x, depth):
        if depth > 50:
            raise ValueError("the value is nested too deeply")
        if x is None or type(x) in (bool, int, float, str):
            return x
        if isinstance(x, torch.Tensor):
            t = x.detach()
            if t.layout != torch.strided:
                t = t.to_dense()
            return t.to("cpu").as_subclass(torch.Tensor).clone()
        for plain in (int, float, str):  # subclasses of the built-ins (numpy's float64, an IntEnum)
            if isinstance(x, plain):
                return plain(x)
        if type(x) in (list, tuple):
            return type(x)(walk(v, depth + 1) for v in x)
        if type(x) is torch.Size:
            return tuple(x)
        if type(x) is dict and all(type(k) in (str, int) for k in x):
            return {k: walk(v, depth + 1) for k, v in x.items()}
        if type(x).__module__ == "numpy":  # arrays and scalars of numbers
            try:
                return torch.as_tensor(x).clone()
            except Exception:  # noqa: BLE001 - an array of objects: keep it in the worker
                pass
        return (REF, keep(x), type(x).__name__[:100], callable(x))

    return walk(value, 0)


def dump_reply(reply) -> bytes:
    buffer = io.BytesIO()
    torch.save(reply, buffer)
    return buffer.getvalue()


def load_reply(payload: bytes):
    """The worker's reply, read with ``weights_only=True``: plain data, nothing executed."""
    value = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    _check_size(value)
    return value


def _check_size(value) -> None:
    total, stack = 0, [value]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            total += x.numel()
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    if total > MAX_ELEMENTS:
        raise ProtocolError(f"a reply with {total} tensor entries (the limit is {MAX_ELEMENTS})")


# --- grader -> worker: pickle, with references to the worker's objects -------------------------------


def dump_request(request, ref_of) -> bytes:
    """Pickle ``request``; ``ref_of(obj)`` gives the worker's id of a remote object (or ``None``)."""
    buffer = io.BytesIO()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ref_of(obj)

    Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(request)
    return buffer.getvalue()


def load_request(payload: bytes, objects: dict):
    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            return objects[int(pid)]

    return Unpickler(io.BytesIO(payload)).load()
