"""The untrusted side of grading: runs one submission's code and answers the grader's calls.

Started by :mod:`icl_course.course.grading` inside the sandbox as ``python -m icl_course.course.worker
REQUESTS REPLIES``, the numbers of two inherited pipe ends (see :mod:`icl_course.course.wire`).
It never sees a check, an expected value or a solution: the grader sends the notebook's code cells,
then asks for the student's functions by name and calls them with the inputs a check made.

Requests and replies::

    ("run", [cell source, ...])          -> ("ran", [note, ...])
    ("lookup", name)                     -> ("value", value) or ("missing", why)
    ("call", ref, args, kwargs)          -> ("value", value) or ("raised", exception type, message)
    ("getattr", ref, name)               -> ("value", value) or ("raised", "AttributeError", message)
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

MESSAGE = 500  # characters of an exception's message sent back (wire.MESSAGE)


def _clean(src: str) -> str:
    """A cell without its IPython magics and shell escapes (``%time``, ``!pip``)."""
    return "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))


def _text(exc: BaseException) -> tuple[str, str]:
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a student's exception whose __str__ raises
        message = "(no message)"
    return type(exc).__name__[:100], message[:MESSAGE]


def serve(requests: int, replies: int) -> None:
    import torch  # noqa: F401 - before any student code, so that its import cost is not theirs

    from . import wire

    objects: dict[int, object] = {}

    def keep(obj) -> int:
        objects[len(objects) + 1] = obj
        return len(objects)

    def reply(message) -> None:
        try:
            payload = wire.dump_reply(message)
        except Exception as exc:  # noqa: BLE001 - a value torch cannot save
            payload = wire.dump_reply(("raised", *_text(exc)))
        wire.send_bytes(replies, payload)

    namespace = {"__name__": "__main__", "display": lambda *a, **k: None}
    quiet = io.StringIO()
    while True:
        try:
            request = wire.load_request(wire.recv_bytes(requests), objects)
        except wire.ProtocolError:
            return  # the grader is done
        kind = request[0]
        if kind == "run":
            notes = []
            for i, src in enumerate(request[1]):
                try:
                    with contextlib.redirect_stdout(quiet):  # the notebook's own check calls say nothing
                        exec(compile(_clean(src), f"<cell {i}>", "exec"), namespace)
                except BaseException as exc:  # noqa: BLE001 - a cell's error is noted, the next cell runs
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    name, message = _text(exc)
                    notes.append(f"code cell {i} raised {name}: {message[:200]}")
                quiet.seek(0)
                quiet.truncate()
            reply(("ran", notes))
            continue
        try:
            if kind == "lookup":
                value = namespace.get(request[1])
                if not callable(value):
                    reply(("missing", f"no function `{request[1]}` is defined"))
                    continue
            elif kind == "call":
                _, target, args, kwargs = request
                with contextlib.redirect_stdout(quiet):
                    value = target(*args, **kwargs)
            elif kind == "getattr":
                value = getattr(request[1], request[2])
            else:
                raise ValueError(f"unknown request {kind!r}")
            reply(("value", wire.encode_value(value, keep)))
        except BaseException as exc:  # noqa: BLE001 - the student's exception goes back as a message
            if isinstance(exc, KeyboardInterrupt):
                raise
            reply(("raised", *_text(exc)))
        finally:
            quiet.seek(0)
            quiet.truncate()


def main(argv: list[str]) -> None:
    requests, replies = int(argv[0]), int(argv[1])
    os.set_inheritable(requests, False)  # not handed on to what the student's code starts
    os.set_inheritable(replies, False)
    sys.stdin = open(os.devnull)
    serve(requests, replies)


if __name__ == "__main__":
    main(sys.argv[1:])
