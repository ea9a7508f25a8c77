"""A batch handler whose answers the tests choose: the same plugin as the
Rust `plugins/batch` (see there), in Python. For each message of a batch,
by its payload: `retry` retries on attempt 1, `reject` rejects, `trap`
raises (which traps the whole call); anything else is published to config
`output` (default `out`) with a header `batch: I/N`."""

import sluice


@sluice.batch_handler
def answer_all(msgs):
    topic = sluice.config("output", "out")
    answers = []
    for index, msg in enumerate(msgs):
        payload = bytes(msg.payload)
        if payload == b"retry" and msg.attempt == 1:
            answers.append(sluice.Retry("asked to retry"))
        elif payload == b"reject":
            answers.append(sluice.Reject("asked to reject"))
        elif payload == b"trap":
            raise RuntimeError("asked to trap")
        else:
            answers.append([sluice.output(
                topic, payload, key=msg.key,
                headers={"batch": f"{index + 1}/{len(msgs)}"})])
    return answers
