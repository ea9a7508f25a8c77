"""JSON enrich, the example written in every plugin language (see
docs/plugins.md): adds an `enriched` object (the topic, the attempt and the
configured region) to a JSON object and publishes it.

Config: `output` (default `enriched`), `region` (default `unknown`). A
payload that is not a JSON object is rejected; a message whose `retry_until`
is an integer above the attempt number is retried.
"""

import json

import sluice


@sluice.handler
def enrich(msg):
    try:
        doc = json.loads(bytes(msg.payload))
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise sluice.Reject("payload is not a JSON object")
    until = doc.get("retry_until")
    if isinstance(until, int) and not isinstance(until, bool) and msg.attempt < until:
        raise sluice.Retry(f"not ready before attempt {until}")
    doc["enriched"] = {
        "topic": msg.topic,
        "attempt": msg.attempt,
        "region": sluice.config("region", "unknown"),
    }
    payload = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    topic = sluice.config("output", "enriched")
    return [sluice.output(topic, payload, key=msg.key, headers={"enriched-by": "enrich"})]
