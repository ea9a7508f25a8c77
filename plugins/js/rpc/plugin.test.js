// Unit tests of plugin.js, run natively against the helper's stand-in host:
// node --test, with a copy of sdk/js/sluice.js next to plugin.js.

import { afterEach, test } from "node:test";
import assert from "node:assert/strict";

import { handle } from "./plugin.js";
import { message, request, output, RequestFailed, testing } from "./sluice.js";

const text = (bytes) => new TextDecoder().decode(bytes);
const asking = { ask: "q", timeout_ms: "250", output: "a" };

afterEach(() => {
  testing.config = {};
  testing.request = undefined;
});

test("an answer replies uppercased to the reply topic", () => {
  testing.config = { role: "answer" };
  const [out] = handle(message("hi", { headers: { "sluice-reply-to": "sluice-reply.r1" } }));
  assert.equal(out.topic, "sluice-reply.r1");
  assert.equal(text(out.payload), "HI");
});

test("an answer rejects a message that asks for no reply", () => {
  testing.config = { role: "answer" };
  assert.throws(() => handle(message("hi")), {
    payload: { tag: "reject", val: "no reply asked for" },
  });
});

test("an asker publishes the reply", () => {
  testing.config = asking;
  const asked = [];
  testing.request = (out, timeoutMs) => {
    asked.push([out.topic, text(out.payload), timeoutMs]);
    return message(text(out.payload).toUpperCase());
  };
  const [out] = handle(message("hi"));
  assert.deepEqual(asked, [["q", "hi", 250]]);
  assert.equal(out.topic, "a");
  assert.equal(text(out.payload), "HI");
  assert.deepEqual(out.headers, [{ name: "question", value: "hi" }]);
});

test("an asker publishes why a request failed", () => {
  testing.config = asking;
  testing.request = (out) => {
    throw new RequestFailed(`timeout: no reply to \`${out.topic}\``);
  };
  const [out] = handle(message("hi"));
  assert.equal(text(out.payload), "timeout: no reply to `q`");
  assert.deepEqual(out.headers, [
    { name: "failed", value: "true" },
    { name: "question", value: "hi" },
  ]);
});

test("a request without a stand-in fails", () => {
  assert.throws(() => request(output("q", "hi")), (e) => {
    assert.ok(e instanceof RequestFailed);
    assert.equal(e.kind, "failed");
    assert.match(e.message, /testing\.request/);
    return true;
  });
});

test("a failure's kind is the first word of the host's reason", () => {
  testing.request = () => {
    throw { payload: "denied: plugin `rpc` may not send requests to `q`" };
  };
  assert.throws(() => request(output("q", "hi")), (e) => {
    assert.ok(e instanceof RequestFailed);
    assert.equal(e.kind, "denied");
    assert.equal(e.message, "denied: plugin `rpc` may not send requests to `q`");
    return true;
  });
});
