"""Test plugin: GETs the URL in the payload with ``sluice.http_get``, which
goes out through wasi:http to the origins the plugin is granted only, and
publishes the response body with its status in the ``status`` header. A
request that gets no response rejects the message with the error (so it is
dead-lettered with the reason); an empty payload is rejected without a
request."""

import sluice


@sluice.handler
def handle(msg):
    url = sluice.text(msg)
    if not url:
        raise sluice.Reject("no URL")
    try:
        status, body = sluice.http_get(url)
    except sluice.HttpError as e:
        raise sluice.Reject(f"GET {url}: {e}")
    return [sluice.output("fetched", body, headers={"status": str(status)})]
