// Test plugin: fetches the URL in the payload, which the host must deny
// (wasi:http is imported by every componentize-js component but granted to
// none). An empty payload is rejected without fetching.

import { handler, output, Reject } from "./sluice.js";

export const handle = handler((msg) => {
  const url = msg.text();
  if (url === "") throw new Reject("no URL");
  fetch(url);
  return [output("fetched", url)];
});
