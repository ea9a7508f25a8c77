"""Request-reply from both ends: the Rust ``plugins/rpc`` (see there) in
Python, with the same outputs, so one test checks every language alike.

Config ``role``:

- ``answer``: replies to each request with its payload uppercased (a
  message that asks for no reply is rejected);
- ``ask`` (the default): sends each message's payload as a request to the
  topic ``ask`` (config, default ``questions``), waiting at most
  ``timeout_ms`` (config, default 1000), and publishes the reply's payload
  to ``output`` (config, default ``answers``); a request that fails
  publishes the reason instead, with the header ``failed`` set, so a test
  can see it. Either carries the question in the header ``question``.
"""

import sluice


@sluice.handler
def rpc(msg):
    if sluice.config("role") == "answer":
        answer = sluice.reply(msg, sluice.text(msg).upper())
        if answer is None:
            raise sluice.Reject("no reply asked for")
        return [answer]
    topic = sluice.config("ask", "questions")
    output = sluice.config("output", "answers")
    question = sluice.output(topic, msg.payload)
    try:
        reply = sluice.request(question, timeout_ms())
        payload, headers = reply.payload, {}
    except sluice.RequestFailed as e:
        payload, headers = str(e), {"failed": "true"}
    headers["question"] = sluice.text(msg)
    return [sluice.output(output, payload, headers=headers)]


def timeout_ms():
    """Config ``timeout_ms`` if it is a u32, as the Rust plugin reads it;
    1000 otherwise."""
    try:
        ms = int(sluice.config("timeout_ms", ""))
    except ValueError:
        return 1000
    return ms if 0 <= ms < 2**32 else 1000
