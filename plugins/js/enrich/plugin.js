// JSON enrich, the example written in every plugin language (see
// docs/plugins.md): adds an `enriched` object (the topic, the attempt and
// the configured region) to a JSON object and publishes it.
//
// Config: `output` (default `enriched`), `region` (default `unknown`). A
// payload that is not a JSON object is rejected; a message whose
// `retry_until` is an integer above the attempt number is retried.

import { handler, output, config, Retry, Reject } from "./sluice.js";

export const handle = handler((msg) => {
  let doc;
  try {
    doc = JSON.parse(new TextDecoder().decode(msg.payload));
  } catch {
    doc = null;
  }
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    throw new Reject("payload is not a JSON object");
  }
  const until = doc.retry_until;
  if (Number.isInteger(until) && msg.attempt < until) {
    throw new Retry(`not ready before attempt ${until}`);
  }
  doc.enriched = { topic: msg.topic, attempt: msg.attempt, region: config("region", "unknown") };
  const topic = config("output", "enriched");
  return [output(topic, JSON.stringify(doc), { key: msg.key, headers: { "enriched-by": "enrich" } })];
});
