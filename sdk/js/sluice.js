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
// Return an array of outputs (or nothing). Throw `Retry` for a transient
// failure (the message comes back after a backoff) or `Reject` for a
// permanent one (it goes to the dead-letter topic). Any other exception
// traps the instance, which the host treats as a failed attempt.
//
// `sluice build` puts this file next to the plugin's own sources and turns
// them into a component with componentize-js.

import * as host from "sluice:plugin/host@0.1.0";

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

/** A transient failure: deliver the message again after a backoff. */
export class Retry extends Error {}

/** A permanent failure: send the message to the dead-letter topic. */
export class Reject extends Error {}

/**
 * A message to publish. A string payload is sent as UTF-8, a Uint8Array as
 * is, anything else as JSON.
 */
export function output(topic, payload, { key, headers } = {}) {
  return {
    topic,
    key: key ?? undefined,
    headers: Object.entries(headers ?? {}).map(([name, value]) => ({ name, value: String(value) })),
    payload: toBytes(payload),
  };
}

/** A value from the plugin's `config` table in the host config. */
export function config(key, fallback) {
  return host.configGet(key) ?? fallback;
}

/** Publishes a message along with the returned outputs (only if the handler succeeds). */
export function publish(out) {
  try {
    host.publish(out);
  } catch (e) {
    throw new Reject(String(e?.payload ?? e));
  }
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

/** Wraps a plain function into the component's exported `handle`. */
export function handler(fn) {
  return (raw) => {
    let outputs;
    try {
      outputs = fn(new Message(raw));
    } catch (e) {
      // componentize-js turns a thrown `{ payload }` into the result's error.
      if (e instanceof Retry) throw failure("retry", e.message);
      if (e instanceof Reject) throw failure("reject", e.message);
      throw e;
    }
    return Array.from(outputs ?? []);
  };
}

function failure(tag, reason) {
  const error = new Error(reason);
  error.payload = { tag, val: reason };
  return error;
}

function toBytes(payload) {
  if (payload instanceof Uint8Array) return payload;
  if (typeof payload === "string") return encoder.encode(payload);
  return encoder.encode(JSON.stringify(payload));
}
