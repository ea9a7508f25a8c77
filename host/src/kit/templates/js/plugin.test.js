// Unit tests of plugin.js, run natively: node --test

import { afterEach, test } from "node:test";
import assert from "node:assert/strict";

import { handle } from "./plugin.js";
import { message, testing } from "./sluice.js";

const text = (bytes) => new TextDecoder().decode(bytes);

afterEach(() => {
  testing.config = {};
});

test("uppercases onto the output topic, keeping the key", () => {
  const [out] = handle(message("hello", { key: "k1" }));
  assert.equal(out.topic, "{{name}}.out");
  assert.equal(out.key, "k1");
  assert.equal(text(out.payload), "HELLO");
  assert.deepEqual(out.headers, [{ name: "by", value: "{{name}}" }]);
});

test("the config names the topic", () => {
  testing.config = { output: "elsewhere" };
  const [out] = handle(message("hello"));
  assert.equal(out.topic, "elsewhere");
});

test("rejects an empty message", () => {
  assert.throws(() => handle(message("")), {
    payload: { tag: "reject", val: "empty payload" },
  });
});
