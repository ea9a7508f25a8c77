// Request-reply from both ends: the Rust `plugins/rpc` (see there) in
// JavaScript, with the same outputs, so one test checks every language
// alike.
//
// Config `role`:
// - `answer`: replies to each request with its payload uppercased (a
//   message that asks for no reply is rejected);
// - `ask` (the default): sends each message's payload as a request to the
//   topic `ask` (config, default `questions`), waiting at most `timeout_ms`
//   (config, default 1000), and publishes the reply's payload to `output`
//   (config, default `answers`); a request that fails publishes the reason
//   instead, with the header `failed` set, so a test can see it. Either
//   carries the question in the header `question`.

import { config, handler, output, reply, Reject, request, RequestFailed } from "./sluice.js";

export const handle = handler((msg) => {
  if (config("role") === "answer") {
    const answer = reply(msg, msg.text().toUpperCase());
    if (answer === undefined) throw new Reject("no reply asked for");
    return [answer];
  }
  const question = output(config("ask", "questions"), msg.payload);
  let payload;
  let headers = {};
  try {
    payload = request(question, timeoutMs()).payload;
  } catch (e) {
    if (!(e instanceof RequestFailed)) throw e;
    payload = e.message;
    headers = { failed: "true" };
  }
  headers.question = msg.text();
  return [output(config("output", "answers"), payload, { headers })];
});

/** Config `timeout_ms` if it is a u32, as the Rust plugin reads it; 1000 otherwise. */
function timeoutMs() {
  const text = config("timeout_ms", "");
  const ms = Number(text);
  return /^\+?[0-9]+$/.test(text) && ms < 2 ** 32 ? ms : 1000;
}
