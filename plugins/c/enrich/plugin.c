/* JSON enrich, the example written in every plugin language (see
 * docs/plugins.md): adds an `enriched` object (the topic, the attempt and
 * the configured region) to a JSON object and publishes it.
 *
 * Config: `output` (default `enriched`), `region` (default `unknown`). A
 * payload that is not a JSON object is rejected; a message whose
 * `retry_until` is an integer above the attempt number is retried. */

#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "sluice.h"

sluice_status sluice_handle(const sluice_message *msg, sluice_outputs *out) {
    const char *text = (const char *)msg->payload;
    json_object_info info;
    if (!json_object_scan(text, msg->payload_len, "retry_until", &info)) {
        return sluice_reject(out, "payload is not a JSON object");
    }
    if (info.value != NULL && json_is_integer(info.value, info.value_len)) {
        long long until = strtoll(info.value, NULL, 10);
        if ((long long)msg->attempt < until) {
            return sluice_retry(out, "not ready before attempt %lld", until);
        }
    }

    /* The object without its closing brace, then the new member. */
    size_t end = msg->payload_len;
    while (text[end - 1] != '}') {
        end--;
    }
    char *region = sluice_config("region");
    sluice_buf doc = {0};
    sluice_buf_append(&doc, text, end - 1);
    sluice_buf_puts(&doc, info.members > 0 ? ",\"enriched\":{\"topic\":" : "\"enriched\":{\"topic\":");
    sluice_buf_json_string(&doc, msg->topic);
    sluice_buf_printf(&doc, ",\"attempt\":%u,\"region\":", (unsigned)msg->attempt);
    sluice_buf_json_string(&doc, region ? region : "unknown");
    sluice_buf_puts(&doc, "}}");
    free(region);

    char *topic = sluice_config("output");
    sluice_output *o = sluice_emit_buf(out, topic ? topic : "enriched", msg->key, &doc);
    free(topic);
    sluice_set_header(o, "enriched-by", "enrich");
    return SLUICE_OK;
}
