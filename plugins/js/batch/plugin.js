// A batch handler whose answers the tests choose: the same plugin as the
// Rust `plugins/batch` (see there), in JavaScript. For each message of a
// batch, by its payload: `retry` retries on attempt 1, `reject` rejects,
// `trap` throws (which traps the whole call); anything else is published to
// config `output` (default `out`) with a header `batch: I/N`.

import { batchHandler, output, config, Retry, Reject } from "./sluice.js";

export const handle = batchHandler((msgs) => {
  const topic = config("output", "out");
  return msgs.map((msg, index) => {
    const payload = new TextDecoder().decode(msg.payload);
    if (payload === "retry" && msg.attempt === 1) return new Retry("asked to retry");
    if (payload === "reject") return new Reject("asked to reject");
    if (payload === "trap") throw new Error("asked to trap");
    return [output(topic, msg.payload, {
      key: msg.key,
      headers: { batch: `${index + 1}/${msgs.length}` },
    })];
  });
});
