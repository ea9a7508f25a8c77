"""Sluice handlers in Python.

A handler is a plain function that takes a message and returns the messages
to publish, decorated with ``@sluice.handler``::

    import sluice

    @sluice.handler
    def handle(msg):
        if not msg.payload:
            raise sluice.Reject("empty payload")
        return [sluice.output("shouted", msg.text().upper())]

Return a list of outputs (or ``None`` for none). Raise ``sluice.Retry`` for a
transient failure (the message comes back after a backoff) or
``sluice.Reject`` for a permanent one (it goes to the dead-letter topic). Any
other exception traps the instance, which the host treats as a failed
attempt.

The host may hand the plugin several messages in one call (a route's
``batch_size``): the function is then called for each. To take the whole
batch at once instead, decorate a function of a list of messages with
``@sluice.batch_handler``; it returns one answer per message, in order: a
list of outputs (or ``None``), or a ``Retry`` or ``Reject`` (returned, not
raised)::

    @sluice.batch_handler
    def handle(msgs):
        return [[sluice.output("copied", m.payload)] if m.payload
                else sluice.Reject("empty payload") for m in msgs]

``sluice build`` puts this module on the path and turns the project into a
component with componentize-py.

Outside a component (``python3 -m unittest`` in the project) the module
works on its own, with a stand-in host: ``config`` reads ``testing.config``
(a dict), ``publish`` appends to ``testing.published`` and ``log`` writes
to stderr. ``message(payload, ...)`` makes a message to hand a handler, and
a handler called directly returns its outputs or raises its ``Retry`` or
``Reject``::

    import unittest, plugin, sluice

    class PluginTest(unittest.TestCase):
        def test_shouts(self):
            [out] = plugin.handle(sluice.message("hi"))
            self.assertEqual(out.payload, b"HI")
"""

import dataclasses
import enum
import json
import sys
from types import SimpleNamespace
from typing import Any, Callable, Iterable, List, Optional, Union

# What the stand-in host reads and keeps, outside a component.
testing = SimpleNamespace(config={}, published=[])


def _stand_ins():
    """The component's types, result wrappers and host, in plain Python,
    shaped as componentize-py generates them."""

    @dataclasses.dataclass
    class Header:
        name: str
        value: str

    @dataclasses.dataclass
    class Message:
        id: str
        topic: str
        key: Optional[str]
        headers: List[Header]
        payload: bytes
        attempt: int
        timestamp_ms: int

    @dataclasses.dataclass
    class Outgoing:
        topic: str
        key: Optional[str]
        headers: List[Header]
        payload: bytes

    @dataclasses.dataclass
    class Failure_Retry:
        value: str

    @dataclasses.dataclass
    class Failure_Reject:
        value: str

    @dataclasses.dataclass
    class Ok:
        value: Any

    class Err(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

    class LogLevel(enum.Enum):
        TRACE = 0
        DEBUG = 1
        INFO = 2
        WARN = 3
        ERROR = 4

    def log(level, message):
        print(f"{level.name.lower()}: {message}", file=sys.stderr)

    for cls in (Header, Message, Outgoing, Failure_Retry, Failure_Reject, Ok):
        cls.__qualname__ = cls.__name__  # reads as `Outgoing(...)` in a failed test

    wit_types = SimpleNamespace(
        Header=Header,
        Message=Message,
        Outgoing=Outgoing,
        Failure_Retry=Failure_Retry,
        Failure_Reject=Failure_Reject,
    )
    stand_in_host = SimpleNamespace(
        LogLevel=LogLevel,
        # Looked up at each call, so a test may replace either.
        config_get=lambda key: testing.config.get(key),
        publish=lambda out: testing.published.append(out),
        log=log,
    )
    return Err, Ok, stand_in_host, wit_types


try:
    from componentize_py_types import Err, Ok
    from wit_world.imports import host, types
except ImportError:  # not in a component: a plain `python3 -m unittest`
    Err, Ok, host, types = _stand_ins()

Message = types.Message
Outgoing = types.Outgoing
Header = types.Header

Payload = Union[bytes, bytearray, str, dict, list]


class Retry(Exception):
    """A transient failure: deliver the message again after a backoff."""


class Reject(Exception):
    """A permanent failure: send the message to the dead-letter topic."""


def output(
    topic: str,
    payload: Payload,
    key: Optional[str] = None,
    headers: Optional[dict] = None,
) -> Outgoing:
    """A message to publish. A str payload is sent as UTF-8; a dict or list
    as compact JSON."""
    return Outgoing(
        topic=topic,
        key=key,
        headers=[Header(name=n, value=v) for n, v in (headers or {}).items()],
        payload=_bytes(payload),
    )


def message(
    payload: Payload,
    topic: str = "test",
    key: Optional[str] = None,
    headers: Optional[dict] = None,
    attempt: int = 1,
    id: str = "test-1",
) -> Message:
    """A message as the host would deliver it, to hand a handler in a test.
    The payload is encoded as ``output`` encodes one."""
    return Message(
        id=id,
        topic=topic,
        key=key,
        headers=[Header(name=n, value=v) for n, v in (headers or {}).items()],
        payload=_bytes(payload),
        attempt=attempt,
        timestamp_ms=0,
    )


def text(msg: Message) -> str:
    """The payload as text; rejects the message if it is not UTF-8."""
    try:
        return bytes(msg.payload).decode("utf-8")
    except UnicodeDecodeError as e:
        raise Reject(f"payload is not valid UTF-8: {e}") from None


def json_payload(msg: Message) -> Any:
    """The payload parsed as JSON; rejects the message if it is not JSON."""
    try:
        return json.loads(text(msg))
    except ValueError as e:
        raise Reject(f"payload is not valid JSON: {e}") from None


def header(msg: Message, name: str) -> Optional[str]:
    """The value of the first header called exactly ``name``."""
    for h in msg.headers:
        if h.name == name:
            return h.value
    return None


def config(key: str, default: Optional[str] = None) -> Optional[str]:
    """A value from the plugin's ``config`` table in the host config."""
    value = host.config_get(key)
    return default if value is None else value


# While a ``@handler`` function runs inside a batch: what it published, kept
# with its own outputs (the host refuses ``publish`` during a batch, since it
# could not tell which message a published one belongs to).
_kept: Optional[List[Outgoing]] = None


def publish(out: Outgoing) -> None:
    """Publishes a message along with the returned outputs (only if the
    handler succeeds). Raises ``Reject`` if the plugin may not publish
    there. Inside a batch, a ``@handler`` function's message is kept with
    that message's outputs (a topic the plugin may not publish to then
    rejects the message when the batch returns); a ``@batch_handler``
    function may not publish (``Reject`` is raised)."""
    if _kept is not None:
        _kept.append(out)
        return
    try:
        host.publish(out)
    except Err as e:
        raise Reject(str(e.value)) from None


def log(level: str, message: str) -> None:
    """Writes a line to the host's log: level is trace, debug, info, warn or
    error."""
    host.log(host.LogLevel[level.upper()], message)


Answer = Union[Optional[Iterable[Outgoing]], Retry, Reject]


def handler(fn: Callable[[Message], Optional[Iterable[Outgoing]]]):
    """Makes ``fn`` the component's exported ``handle``, and its
    ``handle_batch`` (``fn`` called for each message)."""

    class WitWorld:
        def handle(self, msg: Message) -> List[Outgoing]:
            return _unwrap(_each(fn, msg))

        def handle_batch(self, msgs: List[Message]) -> list:
            global _kept
            results = []
            for msg in msgs:
                _kept = []
                try:
                    result = _each(fn, msg)
                    if isinstance(result, Ok):
                        result = Ok(_kept + result.value)
                finally:
                    _kept = None
                results.append(result)
            return results

    _export(fn, WitWorld)
    return fn


def batch_handler(fn: Callable[[List[Message]], List[Answer]]):
    """Makes ``fn``, a function of a list of messages that returns one
    answer per message, the component's ``handle_batch``, and its ``handle``
    (a batch of one). A ``Retry`` or ``Reject`` raised by ``fn`` answers
    every message of the batch."""

    class WitWorld:
        def handle(self, msg: Message) -> List[Outgoing]:
            answers = _batch(fn, [msg])
            if len(answers) != 1:
                raise RuntimeError(f"a batch handler gave {len(answers)} answers for 1 message")
            return _unwrap(answers[0])

        def handle_batch(self, msgs: List[Message]) -> list:
            return _batch(fn, msgs)

    _export(fn, WitWorld)
    return fn


def _export(fn, world) -> None:
    # componentize-py looks for the export class in the entry module.
    setattr(sys.modules[fn.__module__], "WitWorld", world)


def _each(fn, msg: Message):
    """One message's result: Ok(outputs) or Err(failure)."""
    try:
        return _answer(fn(msg))
    except (Retry, Reject) as e:
        return _answer(e)


def _batch(fn, msgs: List[Message]) -> list:
    try:
        answers = fn(msgs)
    except (Retry, Reject) as e:
        return [_answer(e) for _ in msgs]
    return [_answer(a) for a in answers]


def _answer(answer: Answer):
    if isinstance(answer, Retry):
        return Err(types.Failure_Retry(str(answer)))
    if isinstance(answer, Reject):
        return Err(types.Failure_Reject(str(answer)))
    return Ok(list(answer or []))


def _unwrap(result):
    if isinstance(result, Err):
        raise result
    return result.value


def _bytes(payload: Payload) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")
