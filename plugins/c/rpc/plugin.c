/* Request-reply from both ends: the Rust `plugins/rpc` (see there) in C,
 * with the same outputs, so one test checks every language alike.
 *
 * Config `role`:
 * - `answer`: replies to each request with its payload uppercased (a
 *   message that asks for no reply is rejected); only ASCII letters change
 *   case, where the Rust plugin changes every letter Unicode has a case for;
 * - `ask` (the default): sends each message's payload as a request to the
 *   topic `ask` (config, default `questions`), waiting at most `timeout_ms`
 *   (config, default 1000), and publishes the reply's payload to `output`
 *   (config, default `answers`); a request that fails publishes the reason
 *   instead, with the header `failed` set, so a test can see it. Either
 *   carries the question in the header `question`.
 *
 * A payload that is not UTF-8 is rejected where it becomes text, as the
 * Rust plugin rejects it (a header that is not UTF-8 would trap the call);
 * so is a question that holds a NUL byte, which a C string cannot carry
 * into the `question` header. */

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sluice.h"

static bool is_utf8(const uint8_t *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        /* A lead byte says how many continuation bytes follow, and the
         * least code point that needs that many. */
        size_t more;
        uint32_t least;
        if ((c & 0xE0) == 0xC0) {
            more = 1;
            least = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            more = 2;
            least = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            more = 3;
            least = 0x10000;
        } else {
            return false;
        }
        uint32_t point = c & (0x3F >> more);
        if (len - i <= more) {
            return false;
        }
        for (size_t k = 1; k <= more; k++) {
            if ((s[i + k] & 0xC0) != 0x80) {
                return false;
            }
            point = (point << 6) | (s[i + k] & 0x3F);
        }
        /* Overlong forms, surrogates and points past Unicode's end are not UTF-8. */
        if (point < least || (point >= 0xD800 && point <= 0xDFFF) || point > 0x10FFFF) {
            return false;
        }
        i += more + 1;
    }
    return true;
}

static sluice_status answer(const sluice_message *msg, sluice_outputs *out) {
    if (!is_utf8(msg->payload, msg->payload_len)) {
        return sluice_reject(out, "payload is not valid UTF-8");
    }
    uint8_t *upper = malloc(msg->payload_len + 1);
    if (upper == NULL) {
        abort();
    }
    for (size_t i = 0; i < msg->payload_len; i++) {
        uint8_t c = msg->payload[i];
        upper[i] = c >= 'a' && c <= 'z' ? (uint8_t)(c - 'a' + 'A') : c;
    }
    sluice_output *reply = sluice_reply(out, msg, upper, msg->payload_len);
    free(upper);
    if (reply == NULL) {
        return sluice_reject(out, "no reply asked for");
    }
    return SLUICE_OK;
}

/* Config `timeout_ms` if it is a u32, as the Rust plugin reads it; 1000
 * otherwise. */
static uint32_t timeout_ms(void) {
    char *text = sluice_config("timeout_ms");
    uint32_t ms = 1000;
    if (text != NULL) {
        const char *digits = text[0] == '+' ? text + 1 : text;
        char *end;
        errno = 0;
        unsigned long long value = strtoull(digits, &end, 10);
        if (digits[0] >= '0' && digits[0] <= '9' && *end == '\0' && errno == 0 &&
            value <= UINT32_MAX) {
            ms = (uint32_t)value;
        }
    }
    free(text);
    return ms;
}

static sluice_status ask(const sluice_message *msg, sluice_outputs *out) {
    char *topic = sluice_config("ask");
    char *output = sluice_config("output");
    sluice_message reply;
    char *reason = NULL;
    sluice_status status = SLUICE_OK;
    bool answered = sluice_request(topic ? topic : "questions", NULL, msg->payload,
                                   msg->payload_len, timeout_ms(), &reply, &reason);
    if (!is_utf8(msg->payload, msg->payload_len)) {
        status = sluice_reject(out, "payload is not valid UTF-8");
    } else if (memchr(msg->payload, 0, msg->payload_len) != NULL) {
        status = sluice_reject(out, "the question holds a NUL byte, which a C string cannot carry");
    } else if (answered) {
        sluice_output *o =
            sluice_emit(out, output ? output : "answers", NULL, reply.payload, reply.payload_len);
        sluice_set_header(o, "question", (const char *)msg->payload);
    } else {
        sluice_output *o =
            sluice_emit(out, output ? output : "answers", NULL, reason, strlen(reason));
        sluice_set_header(o, "failed", "true");
        sluice_set_header(o, "question", (const char *)msg->payload);
    }
    if (answered) {
        sluice_message_free(&reply);
    }
    free(reason);
    free(output);
    free(topic);
    return status;
}

sluice_status sluice_handle(const sluice_message *msg, sluice_outputs *out) {
    char *role = sluice_config("role");
    bool answering = role != NULL && strcmp(role, "answer") == 0;
    free(role);
    return answering ? answer(msg, out) : ask(msg, out);
}
