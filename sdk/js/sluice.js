// Sluice handlers in JavaScript.
//
// A handler is a plain function that takes a message and returns the
// messages to publish; export it as `handle` through `handler`:
//
//     import { handler, output, Reject } from "./sluice.js";
//
//     export const handle = handler((msg) => {
//       const text = msg.text();
//       if (text === "") throw new Reject("empty payload");
//       return [output("shouted", text.toUpperCase())];
//     });
//
// The function may be `async`, to `await fetch(url)` for instance: a
// request goes out only to the origins the plugin's config grants
// (`allowed_outbound_hosts`), and any other fails with a TypeError.
//
// Return an array of outputs (or nothing). Throw `Retry` for a transient
// failure (the message comes back after a backoff) or `Reject` for a
// permanent one (it goes to the dead-letter topic). Any other exception
// traps the instance, which the host treats as a failed attempt.
//
// The host may hand the plugin several messages in one call (a route's
// `batch_size`): the function is then called for each. To take the whole
// batch at once instead, wrap a function of an array of messages with
// `batchHandler`; it returns one answer per message, in order: an array of
// outputs (or nothing), or a `Retry` or `Reject` (returned, not thrown):
//
//     export const handle = batchHandler((msgs) =>
//       msgs.map((msg) => msg.text() === "" ? new Reject("empty payload")
//                                           : [output("copied", msg.payload)]));
//
// A handler may ask another route and wait for the answer with
// `request(out, timeoutMs)`, which returns the reply message; the host sends
// it only to topics the plugin's config grants (`request_to`). A request
// that gets no reply throws `RequestFailed`, whose `kind` says why. The
// answering route replies with `reply(msg, payload)`, an output to the
// requester's reply topic:
//
//     // checkout: asks, and waits at most 2 s
//     export const handle = handler((msg) => {
//       let quote;
//       try {
//         quote = request(output("prices.quote", msg.payload), 2000);
//       } catch (e) {
//         if (e instanceof RequestFailed) throw new Retry(e.message);
//         throw e;
//       }
//       return [output("orders.priced", quote.payload)];
//     });
//
//     // pricing: a route reading `prices.quote` answers each request
//     export const handle = handler((msg) => {
//       const answer = reply(msg, "4.20");
//       if (answer === undefined) throw new Reject("not a request");
//       return [answer];
//     });
//
// `sluice build` puts this file next to the plugin's own sources and turns
// them into a component with componentize-js; the component's
// `handleBatch` export comes from the plugin's `handle` (see `batchOf`),
// and its entry module hands this file the host (see `connectHost`).
//
// Outside a component (`node --test` in the project) the file works on its
// own, with a stand-in host: `config` reads `testing.config`, `publish`
// appends to `testing.published` and `log` writes to stderr; `request` calls
// `testing.request` (a function of the outgoing message and the timeout
// returning the reply, e.g. made with `message`, or throwing
// `RequestFailed`) and, while it is unset, fails. `message(payload, ...)`
// makes a message to hand a handler; an exported `handle` called
// directly returns its outputs, or throws an error whose `payload` is the
// failure (`{ tag: "reject", val: reason }` or `tag: "retry"`):
//
//     import { test } from "node:test";
//     import assert from "node:assert/strict";
//     import { handle } from "./plugin.js";
//     import { message } from "./sluice.js";
//
//     test("shouts", () => {
//       const [out] = handle(message("hi"));
//       assert.equal(new TextDecoder().decode(out.payload), "HI");
//     });

/** What the stand-in host reads and keeps, outside a component. */
export const testing = { config: {}, published: [], request: undefined };

// The host's capabilities: the stand-in until `connectHost` is called.
let host = {
  configGet: (key) => testing.config[key],
  publish: (out) => {
    testing.published.push(out);
  },
  request: (out, timeoutMs) => {
    if (typeof testing.request !== "function") {
      throw new RequestFailed(`failed: no stand-in for a request to ${out.topic} (testing.request)`);
    }
    return testing.request(out, timeoutMs);
  },
  log: (level, message) => console.error(`${level}: ${message}`),
};

/**
 * Makes `wit`, the component's `sluice:plugin/host` import, the host every
 * call goes to. The entry module `sluice build` writes calls it; a plugin
 * never needs to.
 */
export function connectHost(wit) {
  host = wit;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/** A transient failure: deliver the message again after a backoff. */
export class Retry extends Error {}

/** A permanent failure: send the message to the dead-letter topic. */
export class Reject extends Error {}

/**
 * A message to publish. A string payload is sent as UTF-8, a Uint8Array
 * (or another typed array, such as a delivered message's payload) as is,
 * anything else as JSON.
 */
export function output(topic, payload, { key, headers } = {}) {
  return {
    topic,
    key: key ?? undefined,
    headers: Object.entries(headers ?? {}).map(([name, value]) => ({ name, value: String(value) })),
    payload: toBytes(payload),
  };
}

/**
 * A message as the host would deliver it, to hand a handler in a test. The
 * payload is encoded as `output` encodes one.
 */
export function message(payload, { topic = "test", key, headers, attempt = 1, id = "test-1" } = {}) {
  return {
    id,
    topic,
    key: key ?? undefined,
    headers: Object.entries(headers ?? {}).map(([name, value]) => ({ name, value: String(value) })),
    payload: toBytes(payload),
    attempt,
    timestampMs: 0n,
  };
}

/** A value from the plugin's `config` table in the host config. */
export function config(key, fallback) {
  return host.configGet(key) ?? fallback;
}

// While a `handler` function runs inside a batch: what it published, kept
// with its own outputs (the host refuses `publish` during a batch, since it
// could not tell which message a published one belongs to).
let kept = null;

/**
 * Publishes a message along with the returned outputs (only if the handler
 * succeeds). Inside a batch, a `handler` function's message is kept with
 * that message's outputs (a topic the plugin may not publish to then
 * rejects the message when the batch returns); a `batchHandler` function
 * may not publish (`Reject` is thrown).
 */
export function publish(out) {
  if (kept !== null) {
    kept.push(out);
    return;
  }
  try {
    host.publish(out);
  } catch (e) {
    throw new Reject(String(e?.payload ?? e));
  }
}

/**
 * A request that got no reply; `message` is the host's reason. `kind` is
 * the reason's first word: `timeout` when no reply came in time (no
 * responder, or a slow one), `denied` when the plugin may not send requests
 * to that topic (its `request_to` grant), `failed` otherwise.
 */
export class RequestFailed extends Error {
  constructor(reason) {
    super(reason);
    this.kind = reason.split(":", 1)[0];
  }
}

/**
 * Sends `out` as a request and waits for its reply, at most `timeoutMs` and
 * never past the call's deadline, and returns the reply (a message, with
 * `text()`, `json()` and `header(name)`). The request goes out on the
 * route's output backend; the responder's plugin answers with `reply`.
 * Throws `RequestFailed` with the host's reason when no reply comes:
 * `timeout: ...` when none came in time (no responder, or a slow one),
 * `denied: ...` when the plugin may not send requests to that topic (grant
 * it with `request_to`), `failed: ...` otherwise.
 */
export function request(out, timeoutMs = 1000) {
  let raw;
  try {
    raw = host.request(out, timeoutMs);
  } catch (e) {
    if (e instanceof RequestFailed) throw e;
    // componentize-js throws an import's error result as `{ payload }`.
    throw new RequestFailed(String(e?.payload ?? e));
  }
  return new Message(raw);
}

/**
 * The reply to `msg`, if it is a request (it carries a `sluice-reply-to`
 * header): an output to the requester's reply topic, to which the host adds
 * the request's correlation id; `undefined` if it is not. The payload is
 * encoded as `output` encodes one. Sending it needs the reply topics in the
 * plugin's `publish_to`: `sluice-reply.>` (and `_INBOX.>` for requests from
 * NATS clients).
 */
export function reply(msg, payload) {
  const topic = msg.headers.find((h) => h.name === "sluice-reply-to")?.value;
  return topic === undefined ? undefined : output(topic, payload);
}

/** Writes a line to the host's log: level is trace, debug, info, warn or error. */
export function log(level, message) {
  host.log(level, message);
}

/** The message as the host delivers it, plus `text()`, `json()` and `header(name)`. */
class Message {
  constructor(raw) {
    Object.assign(this, raw);
  }

  /** The payload as text; rejects the message if it is not UTF-8. */
  text() {
    try {
      return decoder.decode(this.payload);
    } catch (e) {
      throw new Reject(`payload is not valid UTF-8: ${e.message}`);
    }
  }

  /** The payload parsed as JSON; rejects the message if it is not JSON. */
  json() {
    try {
      return JSON.parse(this.text());
    } catch (e) {
      if (e instanceof Reject) throw e;
      throw new Reject(`payload is not valid JSON: ${e.message}`);
    }
  }

  /** The value of the first header called exactly `name`. */
  header(name) {
    return this.headers.find((h) => h.name === name)?.value;
  }
}

/**
 * Wraps a plain function into the component's exported `handle`; the
 * component's `handleBatch` calls it for each message, one after another.
 * The function may be `async` (to `await fetch(...)`, say): the host then
 * waits for it, within the call's deadline.
 */
export function handler(fn) {
  const handle = (raw) => {
    const result = answerOne(fn, raw);
    return isPromise(result) ? result.then(unwrap) : unwrap(result);
  };
  handle.batch = (raws) => {
    const answers = [];
    const withKept = (result) => (result.tag === "ok" ? { tag: "ok", val: kept.concat(result.val) } : result);
    // Each message in turn, so what a message publishes, even after an
    // `await`, is kept with its own outputs.
    const from = (index) => {
      for (let i = index; i < raws.length; i++) {
        kept = [];
        let result;
        try {
          result = answerOne(fn, raws[i]);
        } catch (e) {
          kept = null;
          throw e;
        }
        if (isPromise(result)) {
          return result.then(
            (settled) => {
              answers.push(withKept(settled));
              kept = null;
              return from(i + 1);
            },
            (e) => {
              kept = null;
              throw e;
            },
          );
        }
        answers.push(withKept(result));
        kept = null;
      }
      return answers;
    };
    return from(0);
  };
  return handle;
}

/**
 * Wraps a function of an array of messages, answering each, into the
 * component's `handleBatch`; the exported `handle` gives it one message. A
 * `Retry` or `Reject` thrown by `fn` answers every message of the batch.
 */
export function batchHandler(fn) {
  const batch = (raws) => {
    let answers;
    try {
      answers = fn(raws.map((raw) => new Message(raw)));
    } catch (e) {
      if (e instanceof Retry || e instanceof Reject) return raws.map(() => answer(e));
      throw e;
    }
    return Array.from(answers, answer);
  };
  const handle = (raw) => {
    const results = batch([raw]);
    if (results.length !== 1) {
      throw new Error(`a batch handler gave ${results.length} answers for 1 message`);
    }
    return unwrap(results[0]);
  };
  handle.batch = batch;
  return handle;
}

/**
 * The component's `handleBatch` for a plugin module: its own if it exports
 * one, else its `handle`'s (from `handler` or `batchHandler`), else a `handle`
 * call per message. `sluice build` exports this next to `handle`.
 */
export function batchOf(plugin) {
  if (plugin.handleBatch) return plugin.handleBatch;
  if (plugin.handle?.batch) return plugin.handle.batch;
  return (raws) =>
    raws.map((raw) => {
      try {
        return { tag: "ok", val: plugin.handle(raw) };
      } catch (e) {
        if (e?.payload) return { tag: "err", val: e.payload };
        throw e;
      }
    });
}

/**
 * One message's result, `{ tag: "ok", val }` or `{ tag: "err", val }`, or a
 * promise of it if `fn` is async.
 */
function answerOne(fn, raw) {
  let value;
  try {
    value = fn(new Message(raw));
  } catch (e) {
    return failure(e);
  }
  return isPromise(value) ? value.then(answer, failure) : answer(value);
}

/** A thrown `Retry` or `Reject` as a result; anything else goes on up. */
function failure(e) {
  if (e instanceof Retry || e instanceof Reject) return answer(e);
  throw e;
}

function isPromise(value) {
  return typeof value?.then === "function";
}

function answer(value) {
  if (value instanceof Retry) return { tag: "err", val: { tag: "retry", val: value.message } };
  if (value instanceof Reject) return { tag: "err", val: { tag: "reject", val: value.message } };
  return { tag: "ok", val: Array.from(value ?? []) };
}

/** A result as `handle` returns it: the outputs, or a thrown failure. */
function unwrap(result) {
  if (result.tag === "ok") return result.val;
  // componentize-js turns a thrown `{ payload }` into the result's error.
  const error = new Error(result.val.val);
  error.payload = result.val;
  throw error;
}

function toBytes(payload) {
  if (payload instanceof Uint8Array) return payload;
  // A message's payload as delivered is a typed array that is not always
  // this realm's Uint8Array.
  if (ArrayBuffer.isView(payload)) {
    return new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
  }
  if (typeof payload === "string") return encoder.encode(payload);
  return encoder.encode(JSON.stringify(payload));
}
