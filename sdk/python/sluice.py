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

``sluice build`` puts this module on the path and turns the project into a
component with componentize-py.
"""

import json
import sys
from typing import Any, Callable, Iterable, List, Optional, Union

from componentize_py_types import Err
from wit_world.imports import host, types

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


def publish(out: Outgoing) -> None:
    """Publishes a message along with the returned outputs (only if the
    handler succeeds). Raises ``Reject`` if the plugin may not publish
    there."""
    try:
        host.publish(out)
    except Err as e:
        raise Reject(str(e.value)) from None


def log(level: str, message: str) -> None:
    """Writes a line to the host's log: level is trace, debug, info, warn or
    error."""
    host.log(host.LogLevel[level.upper()], message)


def handler(fn: Callable[[Message], Optional[Iterable[Outgoing]]]):
    """Makes ``fn`` the component's exported ``handle``."""

    class WitWorld:
        def handle(self, msg: Message) -> List[Outgoing]:
            try:
                outputs = fn(msg)
            except Retry as e:
                raise Err(types.Failure_Retry(str(e)))
            except Reject as e:
                raise Err(types.Failure_Reject(str(e)))
            return list(outputs or [])

    # componentize-py looks for the export class in the entry module.
    setattr(sys.modules[fn.__module__], "WitWorld", WitWorld)
    return fn


def _bytes(payload: Payload) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")
