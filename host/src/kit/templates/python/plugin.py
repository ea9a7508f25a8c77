"""{{name}}: a Sluice plugin. Uppercases a text message and publishes it to
the topic in config `output` (default `{{name}}.out`); rejects an empty one."""

import sluice


@sluice.handler
def handle(msg):
    text = sluice.text(msg)
    if not text:
        raise sluice.Reject("empty payload")
    topic = sluice.config("output", "{{name}}.out")
    return [sluice.output(topic, text.upper(), key=msg.key, headers={"by": "{{name}}"})]
