/* The glue between sluice.h and the bindings generated from the
 * `batch-handler` world: converts the delivered messages into C strings,
 * calls the plugin's sluice_handle or sluice_handle_batch (whichever it
 * defines; both are weak here), and hands each message's outputs or
 * failure back to the host. */

#include "sluice.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch_handler.h"

#pragma weak sluice_handle
#pragma weak sluice_handle_batch

static void *checked(void *ptr) {
    if (ptr == NULL) {
        abort();
    }
    return ptr;
}

/* While sluice_handle runs inside a batch: where sluice_publish keeps its
 * messages, to go out with that message's outputs (the host refuses
 * `publish` during a batch, since it could not tell which message a
 * published one belongs to). */
static sluice_outputs *kept_published = NULL;

static char *copy_string(const batch_handler_string_t *s) {
    char *copy = checked(malloc(s->len + 1));
    memcpy(copy, s->ptr, s->len);
    copy[s->len] = '\0';
    return copy;
}

static char *dup_cstr(const char *s) {
    return s == NULL ? NULL : checked(strdup(s));
}

/* Moves a C string into a generated string (no copy; ownership passes).
 * The generated code frees only non-empty strings, so an empty one is
 * freed here. */
static batch_handler_string_t take_string(char *s) {
    batch_handler_string_t out = {(uint8_t *)s, strlen(s)};
    if (out.len == 0) {
        free(s);
        out.ptr = NULL;
    }
    return out;
}

static char *vformat(const char *format, va_list args) {
    va_list again;
    va_copy(again, args);
    int len = vsnprintf(NULL, 0, format, args);
    char *text = checked(malloc((size_t)(len < 0 ? 0 : len) + 1));
    vsnprintf(text, (size_t)(len < 0 ? 0 : len) + 1, format, again);
    va_end(again);
    return text;
}

sluice_output *sluice_emit(sluice_outputs *out, const char *topic, const char *key,
                           const void *payload, size_t len) {
    if (out->count == out->capacity) {
        out->capacity = out->capacity ? out->capacity * 2 : 4;
        out->items = checked(realloc(out->items, out->capacity * sizeof *out->items));
    }
    sluice_output *o = &out->items[out->count++];
    o->topic = dup_cstr(topic);
    o->key = dup_cstr(key);
    o->headers = NULL;
    o->header_count = 0;
    o->payload = checked(malloc(len ? len : 1));
    memcpy(o->payload, payload, len);
    o->payload_len = len;
    return o;
}

sluice_output *sluice_emit_buf(sluice_outputs *out, const char *topic, const char *key,
                               sluice_buf *buf) {
    sluice_output *o = sluice_emit(out, topic, key, "", 0);
    free(o->payload);
    o->payload = buf->data ? buf->data : checked(malloc(1));
    o->payload_len = buf->len;
    buf->data = NULL;
    buf->len = buf->capacity = 0;
    return o;
}

void sluice_set_header(sluice_output *o, const char *name, const char *value) {
    o->headers = checked(realloc(o->headers, (o->header_count + 1) * sizeof *o->headers));
    o->headers[o->header_count].name = dup_cstr(name);
    o->headers[o->header_count].value = dup_cstr(value);
    o->header_count++;
}

sluice_status sluice_retry(sluice_outputs *out, const char *format, ...) {
    va_list args;
    va_start(args, format);
    free(out->reason);
    out->reason = vformat(format, args);
    va_end(args);
    return SLUICE_RETRY;
}

sluice_status sluice_reject(sluice_outputs *out, const char *format, ...) {
    va_list args;
    va_start(args, format);
    free(out->reason);
    out->reason = vformat(format, args);
    va_end(args);
    return SLUICE_REJECT;
}

const char *sluice_header_value(const sluice_message *msg, const char *name) {
    for (size_t i = 0; i < msg->header_count; i++) {
        if (strcmp(msg->headers[i].name, name) == 0) {
            return msg->headers[i].value;
        }
    }
    return NULL;
}

char *sluice_config(const char *key) {
    batch_handler_string_t name;
    batch_handler_string_set(&name, key);
    batch_handler_string_t value;
    if (!sluice_plugin_host_config_get(&name, &value)) {
        return NULL;
    }
    char *copy = copy_string(&value);
    batch_handler_string_free(&value);
    return copy;
}

/* A generated `outgoing` built from an output; the output's strings move. */
static sluice_plugin_types_outgoing_t to_outgoing(sluice_output *o) {
    sluice_plugin_types_outgoing_t g;
    g.topic = take_string(o->topic);
    g.key.is_some = o->key != NULL;
    if (o->key != NULL) {
        g.key.val = take_string(o->key);
    }
    g.headers.len = o->header_count;
    g.headers.ptr = o->header_count
                        ? checked(malloc(o->header_count * sizeof *g.headers.ptr))
                        : NULL;
    for (size_t i = 0; i < o->header_count; i++) {
        g.headers.ptr[i].name = take_string((char *)o->headers[i].name);
        g.headers.ptr[i].value = take_string((char *)o->headers[i].value);
    }
    free(o->headers);
    g.payload.ptr = o->payload;
    g.payload.len = o->payload_len;
    if (o->payload_len == 0) {
        free(o->payload);
        g.payload.ptr = NULL;
    }
    return g;
}

bool sluice_publish(const char *topic, const char *key, const void *payload, size_t len,
                    char **error) {
    if (kept_published != NULL) {
        sluice_emit(kept_published, topic, key, payload, len);
        return true;
    }
    sluice_outputs one = {0};
    sluice_output *o = sluice_emit(&one, topic, key, payload, len);
    sluice_plugin_types_outgoing_t g = to_outgoing(o);
    free(one.items);
    batch_handler_string_t reason;
    bool ok = sluice_plugin_host_publish(&g, &reason);
    sluice_plugin_types_outgoing_free(&g);
    if (!ok) {
        if (error != NULL) {
            *error = copy_string(&reason);
        }
        batch_handler_string_free(&reason);
    }
    return ok;
}

void sluice_log(sluice_level level, const char *format, ...) {
    va_list args;
    va_start(args, format);
    batch_handler_string_t text = take_string(vformat(format, args));
    va_end(args);
    sluice_plugin_host_log((sluice_plugin_host_log_level_t)level, &text);
    batch_handler_string_free(&text);
}

void sluice_buf_append(sluice_buf *buf, const void *data, size_t len) {
    if (buf->len + len + 1 > buf->capacity) {
        size_t want = buf->capacity ? buf->capacity * 2 : 64;
        while (want < buf->len + len + 1) {
            want *= 2;
        }
        buf->data = checked(realloc(buf->data, want));
        buf->capacity = want;
    }
    memcpy(buf->data + buf->len, data, len);
    buf->len += len;
    buf->data[buf->len] = '\0';
}

void sluice_buf_puts(sluice_buf *buf, const char *text) {
    sluice_buf_append(buf, text, strlen(text));
}

void sluice_buf_printf(sluice_buf *buf, const char *format, ...) {
    va_list args;
    va_start(args, format);
    char *text = vformat(format, args);
    va_end(args);
    sluice_buf_puts(buf, text);
    free(text);
}

void sluice_buf_json_string(sluice_buf *buf, const char *text) {
    sluice_buf_puts(buf, "\"");
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        switch (*c) {
        case '"': sluice_buf_puts(buf, "\\\""); break;
        case '\\': sluice_buf_puts(buf, "\\\\"); break;
        case '\n': sluice_buf_puts(buf, "\\n"); break;
        case '\r': sluice_buf_puts(buf, "\\r"); break;
        case '\t': sluice_buf_puts(buf, "\\t"); break;
        default:
            if (*c < 0x20) {
                sluice_buf_printf(buf, "\\u%04x", *c);
            } else {
                sluice_buf_append(buf, c, 1);
            }
        }
    }
    sluice_buf_puts(buf, "\"");
}

void sluice_buf_free(sluice_buf *buf) {
    free(buf->data);
    buf->data = NULL;
    buf->len = buf->capacity = 0;
}

/* A C view of a delivered message; frees the generated one. */
static sluice_message take_message(batch_handler_message_t *raw) {
    sluice_header *headers = raw->headers.len
                                 ? checked(malloc(raw->headers.len * sizeof *headers))
                                 : NULL;
    for (size_t i = 0; i < raw->headers.len; i++) {
        headers[i].name = copy_string(&raw->headers.ptr[i].name);
        headers[i].value = copy_string(&raw->headers.ptr[i].value);
    }
    uint8_t *payload = checked(malloc(raw->payload.len + 1));
    memcpy(payload, raw->payload.ptr, raw->payload.len);
    payload[raw->payload.len] = '\0';
    sluice_message msg = {
        .id = copy_string(&raw->id),
        .topic = copy_string(&raw->topic),
        .key = raw->key.is_some ? copy_string(&raw->key.val) : NULL,
        .headers = headers,
        .header_count = raw->headers.len,
        .payload = payload,
        .payload_len = raw->payload.len,
        .attempt = raw->attempt,
        .timestamp_ms = raw->timestamp_ms,
    };
    batch_handler_message_free(raw);
    return msg;
}

void sluice_message_free(sluice_message *msg) {
    free((char *)msg->id);
    free((char *)msg->topic);
    free((char *)msg->key);
    for (size_t i = 0; i < msg->header_count; i++) {
        free((char *)msg->headers[i].name);
        free((char *)msg->headers[i].value);
    }
    free((void *)msg->headers);
    free((void *)msg->payload);
    /* A second free of the same message then frees nothing. */
    *msg = (sluice_message){0};
}

bool sluice_request(const char *topic, const char *key, const void *payload, size_t len,
                    uint32_t timeout_ms, sluice_message *reply, char **error) {
    sluice_outputs one = {0};
    sluice_output *o = sluice_emit(&one, topic, key, payload, len);
    sluice_plugin_types_outgoing_t g = to_outgoing(o);
    free(one.items);
    sluice_plugin_host_message_t raw;
    batch_handler_string_t reason;
    bool ok = sluice_plugin_host_request(&g, timeout_ms, &raw, &reason);
    sluice_plugin_types_outgoing_free(&g);
    if (ok) {
        *reply = take_message(&raw);
    } else {
        if (error != NULL) {
            *error = copy_string(&reason);
        }
        batch_handler_string_free(&reason);
    }
    return ok;
}

sluice_output *sluice_reply(sluice_outputs *out, const sluice_message *msg, const void *payload,
                            size_t len) {
    const char *topic = sluice_header_value(msg, "sluice-reply-to");
    return topic == NULL ? NULL : sluice_emit(out, topic, NULL, payload, len);
}

/* The generated result for one message: on SLUICE_OK what it published,
 * then its outputs; otherwise the reason. Both output lists are emptied. */
static batch_handler_result_list_outgoing_failure_t answer(sluice_status status,
                                                           sluice_outputs *published,
                                                           sluice_outputs *out) {
    batch_handler_result_list_outgoing_failure_t result;
    if (status == SLUICE_OK) {
        size_t count = published->count + out->count;
        result.is_err = false;
        result.val.ok.len = count;
        result.val.ok.ptr = count ? checked(malloc(count * sizeof *result.val.ok.ptr)) : NULL;
        size_t n = 0;
        for (size_t i = 0; i < published->count; i++) {
            result.val.ok.ptr[n++] = to_outgoing(&published->items[i]);
        }
        for (size_t i = 0; i < out->count; i++) {
            result.val.ok.ptr[n++] = to_outgoing(&out->items[i]);
        }
    } else {
        sluice_outputs *lists[] = {published, out};
        for (size_t l = 0; l < 2; l++) {
            for (size_t i = 0; i < lists[l]->count; i++) {
                sluice_plugin_types_outgoing_t g = to_outgoing(&lists[l]->items[i]);
                sluice_plugin_types_outgoing_free(&g);
            }
        }
        char *reason = out->reason ? out->reason : dup_cstr("no reason given");
        out->reason = NULL;
        result.is_err = true;
        result.val.err.tag = status == SLUICE_RETRY ? SLUICE_PLUGIN_TYPES_FAILURE_RETRY
                                                    : SLUICE_PLUGIN_TYPES_FAILURE_REJECT;
        if (status == SLUICE_RETRY) {
            result.val.err.val.retry = take_string(reason);
        } else {
            result.val.err.val.reject = take_string(reason);
        }
    }
    free(published->items);
    free(published->reason);
    free(out->items);
    free(out->reason);
    return result;
}

static void no_handler(void) {
    fprintf(stderr, "the plugin defines neither sluice_handle nor sluice_handle_batch\n");
    abort();
}

/* The world's `handle` export: one message. */
bool exports_batch_handler_handle(batch_handler_message_t *raw,
                                  batch_handler_list_outgoing_t *ret,
                                  batch_handler_failure_t *err) {
    sluice_message msg = take_message(raw);
    sluice_outputs published = {0};
    sluice_outputs out = {0};
    sluice_status status = SLUICE_OK;
    if (sluice_handle) {
        status = sluice_handle(&msg, &out);
    } else if (sluice_handle_batch) {
        sluice_handle_batch(&msg, 1, &out, &status);
    } else {
        no_handler();
    }
    sluice_message_free(&msg);
    batch_handler_result_list_outgoing_failure_t result = answer(status, &published, &out);
    if (!result.is_err) {
        *ret = result.val.ok;
        return true;
    }
    *err = result.val.err;
    return false;
}

/* The world's `handle-batch` export: several messages, one result each. */
void exports_batch_handler_handle_batch(batch_handler_list_message_t *raw,
                                        batch_handler_list_result_list_outgoing_failure_t *ret) {
    size_t count = raw->len;
    size_t room = count ? count : 1;
    sluice_message *msgs = checked(malloc(room * sizeof *msgs));
    for (size_t i = 0; i < count; i++) {
        msgs[i] = take_message(&raw->ptr[i]);
    }
    /* Each element was freed by take_message; only the array is left. */
    free(raw->ptr);
    sluice_outputs *published = checked(calloc(room, sizeof *published));
    sluice_outputs *outs = checked(calloc(room, sizeof *outs));
    sluice_status *statuses = checked(malloc(room * sizeof *statuses));
    for (size_t i = 0; i < count; i++) {
        statuses[i] = SLUICE_OK;
    }
    if (sluice_handle_batch) {
        sluice_handle_batch(msgs, count, outs, statuses);
    } else if (sluice_handle) {
        for (size_t i = 0; i < count; i++) {
            kept_published = &published[i];
            statuses[i] = sluice_handle(&msgs[i], &outs[i]);
            kept_published = NULL;
        }
    } else {
        no_handler();
    }
    ret->len = count;
    ret->ptr = checked(malloc(room * sizeof *ret->ptr));
    for (size_t i = 0; i < count; i++) {
        ret->ptr[i] = answer(statuses[i], &published[i], &outs[i]);
        sluice_message_free(&msgs[i]);
    }
    free(msgs);
    free(published);
    free(outs);
    free(statuses);
}
