/* {{name}}: a Sluice plugin. Uppercases a text message and publishes it to
 * the topic in config `output` (default `{{name}}.out`); rejects an empty one. */

#include <ctype.h>
#include <stdlib.h>

#include "sluice.h"

sluice_status sluice_handle(const sluice_message *msg, sluice_outputs *out) {
    if (msg->payload_len == 0) {
        return sluice_reject(out, "empty payload");
    }
    char *topic = sluice_config("output");
    sluice_output *o = sluice_emit(out, topic ? topic : "{{name}}.out", msg->key,
                                   msg->payload, msg->payload_len);
    free(topic);
    for (size_t i = 0; i < o->payload_len; i++) {
        o->payload[i] = (uint8_t)toupper(o->payload[i]);
    }
    sluice_set_header(o, "by", "{{name}}");
    return SLUICE_OK;
}
