// {{name}}: a Sluice plugin. Uppercases a text message and publishes it to
// the topic in config `output` (default `{{name}}.out`); rejects an empty one.

import { handler, output, config, Reject } from "./sluice.js";

export const handle = handler((msg) => {
  const text = msg.text();
  if (text === "") throw new Reject("empty payload");
  const topic = config("output", "{{name}}.out");
  return [output(topic, text.toUpperCase(), { key: msg.key, headers: { by: "{{name}}" } })];
});
