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

A handler may call HTTP APIs with ``http_get(url)``, which answers the
status and the body; the host sends the request only if the plugin's
config grants the URL's origin (``allowed_outbound_hosts``), and follows
no redirect (a 3xx comes back as it is). A request that gets no response
raises ``HttpError``, whose ``code`` says why (``HttpRequestDenied`` for an
origin not granted)::

    @sluice.handler
    def handle(msg):
        try:
            status, body = sluice.http_get(f"https://api.example.com/users/{msg.key}")
        except sluice.HttpError as e:
            raise sluice.Retry(str(e))
        return [sluice.output("users.enriched", body)]

A handler may ask another route and wait for the answer with
``request(out, timeout_ms)``, which answers the reply message; the host
sends it only to topics the plugin's config grants (``request_to``). A
request that gets no reply raises ``RequestFailed``, whose ``kind`` says
why. The answering route replies with ``reply(msg, payload)``, an output to
the requester's reply topic::

    # checkout: asks, and waits at most 2 s
    @sluice.handler
    def handle(msg):
        try:
            quote = sluice.request(sluice.output("prices.quote", msg.payload), 2000)
        except sluice.RequestFailed as e:
            raise sluice.Retry(str(e))
        return [sluice.output("orders.priced", quote.payload)]

    # pricing: a route reading `prices.quote` answers each request
    @sluice.handler
    def handle(msg):
        answer = sluice.reply(msg, "4.20")
        if answer is None:
            raise sluice.Reject("not a request")
        return [answer]

``sluice build`` puts this module on the path and turns the project into a
component with componentize-py.

Outside a component (``python3 -m unittest`` in the project) the module
works on its own, with a stand-in host: ``config`` reads ``testing.config``
(a dict), ``publish`` appends to ``testing.published`` and ``log`` writes
to stderr; ``http_get`` calls ``testing.http`` (a function of the URL and
the headers answering ``(status, body)``, or raising ``HttpError``) and,
while it is ``None``, is denied as in a plugin granted no origin;
``request`` calls ``testing.request`` (a function of the outgoing message
and the timeout answering the reply, e.g. made with ``message``, or
raising ``RequestFailed``) and, while it is ``None``, fails.
``message(payload, ...)`` makes a message to hand a handler, and
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
import urllib.parse
from types import SimpleNamespace
from typing import Any, Callable, Iterable, List, Optional, Tuple, Union

# What the stand-in host reads and keeps, outside a component.
testing = SimpleNamespace(config={}, published=[], http=None, request=None)


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

    def request(out, timeout_ms):
        if testing.request is None:
            raise Err(f"failed: no stand-in for a request to {out.topic} (sluice.testing.request)")
        return testing.request(out, timeout_ms)

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
        request=request,
        log=log,
    )
    return Err, Ok, stand_in_host, wit_types


try:
    from componentize_py_types import Err, Ok
    from wit_world.imports import host, types
except ImportError:  # not in a component: a plain `python3 -m unittest`
    Err, Ok, host, types = _stand_ins()

try:
    from wit_world.imports import http_types, outgoing_handler, streams
except ImportError:  # not in a component, or built without wasi:http
    http_types = outgoing_handler = streams = None

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


class RequestFailed(Exception):
    """A request that got no reply; ``str()`` is the host's reason. ``kind``
    is the reason's first word: ``timeout`` when no reply came in time (no
    responder, or a slow one), ``denied`` when the plugin may not send
    requests to that topic (its ``request_to`` grant), ``failed``
    otherwise."""

    def __init__(self, reason: str):
        self.kind = reason.partition(":")[0]
        super().__init__(reason)


def request(out: Outgoing, timeout_ms: int = 1000) -> Message:
    """Sends ``out`` as a request and waits for its reply, at most
    ``timeout_ms`` and never past the call's deadline, and answers the
    reply. The request goes out on the route's output backend; the
    responder's plugin answers with ``reply``. Raises ``RequestFailed``
    with the host's reason when no reply comes: ``timeout: ...`` when none
    came in time (no responder, or a slow one), ``denied: ...`` when the
    plugin may not send requests to that topic (grant it with
    ``request_to``), ``failed: ...`` otherwise."""
    try:
        return host.request(out, timeout_ms)
    except Err as e:
        raise RequestFailed(str(e.value)) from None


def reply(msg: Message, payload: Payload) -> Optional[Outgoing]:
    """The reply to ``msg``, if it is a request (it carries a
    ``sluice-reply-to`` header): an output to the requester's reply topic,
    to which the host adds the request's correlation id; ``None`` if it is
    not. The payload is encoded as ``output`` encodes one. Sending it needs
    the reply topics in the plugin's ``publish_to``: ``sluice-reply.>``
    (and ``_INBOX.>`` for requests from NATS clients)."""
    topic = header(msg, "sluice-reply-to")
    return None if topic is None else output(topic, payload)


def log(level: str, message: str) -> None:
    """Writes a line to the host's log: level is trace, debug, info, warn or
    error."""
    host.log(host.LogLevel[level.upper()], message)


class HttpError(Exception):
    """An HTTP request that got no response. ``code`` is the ``wasi:http``
    error code's name: ``HttpRequestDenied`` when the plugin's config does
    not grant the URL's origin, ``ConnectionRefused``, ``DnsError``,
    ``ConnectionTimeout`` and so on."""

    def __init__(self, code: str, detail: Optional[str] = None):
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


def http_get(url: str, headers: Optional[dict] = None) -> Tuple[int, bytes]:
    """GETs ``url`` (http or https) and answers ``(status, body)``. Any
    status is an answer, a redirect's included: nothing follows it. Raises
    ``HttpError`` when there is no response, ``HttpRequestDenied`` at once
    for an origin the plugin is not granted, and ``ValueError`` for a
    header ``wasi:http`` refuses (``Host``, ``Connection``...). The request
    shares the call's deadline: one still waiting then fails the call as a
    timeout."""
    if outgoing_handler is None:
        if testing.http is None:
            raise HttpError("HttpRequestDenied", f"no stand-in for GET {url} (sluice.testing.http)")
        return testing.http(url, dict(headers or {}))
    request = _request(url, headers or {})
    try:
        pending = outgoing_handler.handle(request, None)
    except Err as e:
        raise _http_error(e.value) from None
    with pending:
        with pending.subscribe() as ready:
            ready.block()
        answer = pending.get()
    # After `block`, `get` has the answer and gives it this once: anything
    # but Ok(...) would be a fault here, not on the network.
    if answer is None or isinstance(answer, Err):
        raise HttpError("InternalError", "the response was not there after waiting for it")
    if isinstance(answer.value, Err):
        raise _http_error(answer.value.value)
    # Dropped in order, child first; the host counts the request as in
    # flight until its body is dropped (`max_outbound_requests`).
    with answer.value.value as response:
        status = response.status()
        with response.consume() as body, body.stream() as stream:
            return status, _read_all(stream)


def _request(url: str, headers: dict):
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise HttpError("HttpRequestUriInvalid", f"not an absolute URL: {url!r}")
    try:
        fields = http_types.Fields.from_list(
            [(name, str(value).encode("utf-8")) for name, value in headers.items()]
        )
    except Err as e:
        problem = type(e.value).__name__.split("_", 1)[-1]
        raise ValueError(f"headers {sorted(headers)}: {problem}") from None
    request = http_types.OutgoingRequest(fields)
    scheme = {
        "http": http_types.Scheme_Http(),
        "https": http_types.Scheme_Https(),
    }.get(parts.scheme.lower()) or http_types.Scheme_Other(parts.scheme)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    for what, setter, value in (
        ("method", request.set_method, http_types.Method_Get()),
        ("scheme", request.set_scheme, scheme),
        ("authority", request.set_authority, parts.netloc),
        ("path", request.set_path_with_query, path),
    ):
        try:
            setter(value)
        except Err:
            raise HttpError("HttpRequestUriInvalid", f"the {what} of {url!r}") from None
    return request


def _read_all(stream) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(stream.blocking_read(64 * 1024))
        except Err as e:
            if isinstance(e.value, streams.StreamError_Closed):
                return b"".join(chunks)
            with e.value.value as error:
                code = http_types.http_error_code(error)
                if code is not None:
                    raise _http_error(code) from None
                raise HttpError("HttpResponseIncomplete", error.to_debug_string()) from None


def _http_error(code) -> HttpError:
    """``HttpError`` for a ``wasi:http`` error code: ``ErrorCode_X`` is X,
    with its payload, if any, as the detail."""
    name = type(code).__name__.split("_", 1)[-1]
    if name == "HttpRequestDenied":
        detail = "the origin is not in the plugin's allowed_outbound_hosts"
    else:
        value = getattr(code, "value", None)
        detail = None if value is None else str(value)
    return HttpError(name, detail)


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
