"""A handler written against the `wasi:messaging@0.2.0-draft` WIT alone
(world `messaging-core`), made a component by componentize-py with no
Sluice helper, so the host's tests can show that it runs components nobody
wrote in Sluice's terms.

It does what the Rust one in plugins/wasi_messaging does, less `ping` and
`ask:` (this world has no request-reply); see that crate's doc comment. The
xtask's `plugins` builds it into target/wasi_messaging.wasm here.
"""

import os

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import producer, types


class IncomingHandler(exports.IncomingHandler):
    def handle(self, message: types.Message) -> None:
        # An error raised as Err(...) from here, or from a host call left
        # to propagate, is what the handler returns.
        client = types.Client.connect(os.environ.get("MESSAGING_CLIENT", "default"))
        data = message.data()
        topic = message.topic()
        done = f"{'unknown' if topic is None else topic}.done"
        if data == b"fail":
            raise Err(types.Error_Other("asked to fail"))
        if data == b"forbidden":
            producer.send(client, "forbidden.out", types.Message(b"x"))
            return
        if data.startswith(b"burst:"):
            try:
                count = int(data[len(b"burst:") :].decode("ascii"))
            except ValueError:
                raise Err(types.Error_Other("burst: needs a decimal count")) from None
            for i in range(count):
                producer.send(client, done, types.Message(str(i).encode()))
            return
        out = types.Message(data.upper())
        out.set_content_type("text/plain")
        for key, value in message.metadata() or []:
            out.add_metadata(key, value)
        out.add_metadata("handled-by", "python")
        content_type = message.content_type()
        out.add_metadata("input-content-type", "none" if content_type is None else content_type)
        producer.send(client, done, out)
