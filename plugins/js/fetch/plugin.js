// Test plugin: fetches the URL in the payload with `fetch`, which goes out
// through wasi:http to the origins the plugin is granted only, and
// publishes the response body with its status in the `status` header. A
// failed fetch rejects the message with the error; an empty payload is
// rejected without fetching.

import { handler, output, Reject } from "./sluice.js";

export const handle = handler(async (msg) => {
  const url = msg.text();
  if (url === "") throw new Reject("no URL");
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new Reject(`GET ${url}: ${e}`);
  }
  const body = await response.text();
  return [output("fetched", body, { headers: { status: response.status } })];
});
