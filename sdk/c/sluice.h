/* Sluice handlers in C.
 *
 * A handler is one function, `sluice_handle`, that reads a message and
 * either emits outputs and returns SLUICE_OK, or returns sluice_retry(...)
 * (a transient failure: the message comes back after a backoff) or
 * sluice_reject(...) (a permanent one: it goes to the dead-letter topic):
 *
 *     #include "sluice.h"
 *
 *     sluice_status sluice_handle(const sluice_message *msg, sluice_outputs *out) {
 *         if (msg->payload_len == 0) return sluice_reject(out, "empty payload");
 *         sluice_emit(out, "copied", msg->key, msg->payload, msg->payload_len);
 *         return SLUICE_OK;
 *     }
 *
 * Everything the message points to is valid during the call only. Outputs
 * are owned by `out`. `sluice build` generates the world's bindings, puts
 * this header on the include path and links sluice.c in.
 *
 * The host may hand a plugin several messages in one call (a route's
 * `batch_size`); sluice_handle is then called for each, and
 * sluice_publish keeps its message with that message's outputs. A plugin
 * that wants the whole batch at once (to share work between its messages)
 * defines sluice_handle_batch instead of, or besides, sluice_handle:
 *
 *     void sluice_handle_batch(const sluice_message *msgs, size_t count,
 *                              sluice_outputs *outs, sluice_status *statuses) {
 *         for (size_t i = 0; i < count; i++) {
 *             sluice_emit(&outs[i], "copied", msgs[i].key, msgs[i].payload,
 *                         msgs[i].payload_len);
 *         }
 *     }
 *
 * Each message gets its own outputs (`outs[i]`) and status (`statuses[i]`,
 * SLUICE_OK unless set, e.g. `statuses[i] = sluice_retry(&outs[i], ...)`).
 * sluice_publish fails during sluice_handle_batch: emit into `outs[i]`.
 *
 * A handler may ask another route and wait for the answer with
 * sluice_request, which gives the reply message; the host sends it only to
 * topics the plugin's config grants (`request_to`). The answering route
 * replies with sluice_reply, an output to the requester's reply topic:
 *
 *     // checkout: asks, and waits at most 2 s
 *     sluice_message quote;
 *     char *why;
 *     if (!sluice_request("prices.quote", NULL, msg->payload, msg->payload_len, 2000,
 *                         &quote, &why)) {
 *         sluice_status status = sluice_retry(out, "%s", why);
 *         free(why);
 *         return status;
 *     }
 *     sluice_emit(out, "orders.priced", NULL, quote.payload, quote.payload_len);
 *     sluice_message_free(&quote);
 *
 *     // pricing: a route reading `prices.quote` answers each request
 *     if (!sluice_reply(out, msg, "4.20", 4)) return sluice_reject(out, "not a request");
 */
#ifndef SLUICE_H
#define SLUICE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *name;
    const char *value;
} sluice_header;

/* A delivered message; every string is NUL-terminated. */
typedef struct {
    const char *id;
    const char *topic;
    /* NULL when the publisher gave no key. */
    const char *key;
    const sluice_header *headers;
    size_t header_count;
    /* Followed by a NUL byte, so a text payload is also a C string. */
    const uint8_t *payload;
    size_t payload_len;
    /* 1 on first delivery, 2 on the first retry, and so on. */
    uint32_t attempt;
    uint64_t timestamp_ms;
} sluice_message;

/* A message to publish; change its fields freely (they are malloc'd). */
typedef struct {
    char *topic;
    char *key;
    sluice_header *headers;
    size_t header_count;
    uint8_t *payload;
    size_t payload_len;
} sluice_output;

/* What the handler returns: its outputs, or why it failed. */
typedef struct {
    sluice_output *items;
    size_t count;
    size_t capacity;
    char *reason;
} sluice_outputs;

typedef enum { SLUICE_OK, SLUICE_RETRY, SLUICE_REJECT } sluice_status;

typedef enum {
    SLUICE_TRACE,
    SLUICE_DEBUG,
    SLUICE_INFO,
    SLUICE_WARN,
    SLUICE_ERROR
} sluice_level;

/* A growable byte buffer, for building payloads. */
typedef struct {
    uint8_t *data;
    size_t len;
    size_t capacity;
} sluice_buf;

/* The function every C plugin defines (or sluice_handle_batch, or both). */
sluice_status sluice_handle(const sluice_message *msg, sluice_outputs *out);
/* Handles `count` messages in one call: message i's outputs or reason go
 * to outs[i], its status to statuses[i] (each SLUICE_OK on entry). When
 * only this is defined, a single message is handled as a batch of one. */
void sluice_handle_batch(const sluice_message *msgs, size_t count, sluice_outputs *outs,
                         sluice_status *statuses);

/* Adds an output with a copy of `payload` (`key` may be NULL). The pointer
 * stays valid until the next sluice_emit. */
sluice_output *sluice_emit(sluice_outputs *out, const char *topic, const char *key,
                           const void *payload, size_t len);
/* Adds an output that takes over the buffer's bytes (the buffer is emptied). */
sluice_output *sluice_emit_buf(sluice_outputs *out, const char *topic, const char *key,
                               sluice_buf *buf);
/* Appends a header to an output. */
void sluice_set_header(sluice_output *output, const char *name, const char *value);

/* Record the reason (printf-style) and return SLUICE_RETRY / SLUICE_REJECT. */
sluice_status sluice_retry(sluice_outputs *out, const char *format, ...)
    __attribute__((format(printf, 2, 3)));
sluice_status sluice_reject(sluice_outputs *out, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

/* The value of the first header called exactly `name`, or NULL. */
const char *sluice_header_value(const sluice_message *msg, const char *name);
/* A value of the plugin's `config` table (malloc'd; free it), or NULL. */
char *sluice_config(const char *key);
/* Publishes a message along with the outputs (only if the handler succeeds).
 * Returns false if the host refused; then *error (if not NULL) gets the
 * reason, malloc'd. When sluice_handle runs inside a batch, the message is
 * kept with that message's outputs instead (a topic the plugin may not
 * publish to then rejects the message when the batch returns); during
 * sluice_handle_batch the host always refuses. */
bool sluice_publish(const char *topic, const char *key, const void *payload, size_t len,
                    char **error);
/* Sends a request to `topic` (`key` may be NULL) and waits for its reply, at
 * most `timeout_ms` and never past the call's deadline. The request goes
 * out on the route's output backend; the responder's plugin answers with
 * sluice_reply. Returns true with the reply in *reply (free it with
 * sluice_message_free), or false with the host's reason in *error (if not
 * NULL; malloc'd, free it): "timeout: ..." when no reply came in time (no
 * responder, or a slow one), "denied: ..." when the plugin may not send
 * requests to that topic (grant it with `request_to`), "failed: ..."
 * otherwise. */
bool sluice_request(const char *topic, const char *key, const void *payload, size_t len,
                    uint32_t timeout_ms, sluice_message *reply, char **error);
/* Frees what a message from sluice_request holds (not `msg` itself). */
void sluice_message_free(sluice_message *msg);
/* Adds the reply to `msg`, if it is a request (it carries a
 * `sluice-reply-to` header): an output with a copy of `payload` to the
 * requester's reply topic, to which the host adds the request's
 * correlation id; as sluice_emit's, the pointer stays valid until the next
 * sluice_emit. Returns NULL, adding nothing, if `msg` is not a request.
 * Sending it needs the reply topics in the plugin's `publish_to`:
 * `sluice-reply.>` (and `_INBOX.>` for requests from NATS clients). */
sluice_output *sluice_reply(sluice_outputs *out, const sluice_message *msg, const void *payload,
                            size_t len);
/* Writes a line to the host's log (printf-style). */
void sluice_log(sluice_level level, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

void sluice_buf_append(sluice_buf *buf, const void *data, size_t len);
void sluice_buf_puts(sluice_buf *buf, const char *text);
void sluice_buf_printf(sluice_buf *buf, const char *format, ...)
    __attribute__((format(printf, 2, 3)));
/* Appends `text` as a quoted, escaped JSON string. */
void sluice_buf_json_string(sluice_buf *buf, const char *text);
void sluice_buf_free(sluice_buf *buf);

#endif
