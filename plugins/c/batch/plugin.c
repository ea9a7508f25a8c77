/* A batch handler whose answers the tests choose: the same plugin as the
 * Rust `plugins/batch` (see there), in C. For each message of a batch, by
 * its payload: `retry` retries on attempt 1, `reject` rejects, `trap`
 * aborts (which traps the whole call); anything else is published to
 * config `output` (default `out`) with a header `batch: I/N`. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluice.h"

void sluice_handle_batch(const sluice_message *msgs, size_t count, sluice_outputs *outs,
                         sluice_status *statuses) {
    char *topic = sluice_config("output");
    for (size_t i = 0; i < count; i++) {
        const char *payload = (const char *)msgs[i].payload;
        if (strcmp(payload, "retry") == 0 && msgs[i].attempt == 1) {
            statuses[i] = sluice_retry(&outs[i], "asked to retry");
        } else if (strcmp(payload, "reject") == 0) {
            statuses[i] = sluice_reject(&outs[i], "asked to reject");
        } else if (strcmp(payload, "trap") == 0) {
            abort();
        } else {
            sluice_output *o = sluice_emit(&outs[i], topic ? topic : "out", msgs[i].key,
                                           msgs[i].payload, msgs[i].payload_len);
            char place[48];
            snprintf(place, sizeof place, "%zu/%zu", i + 1, count);
            sluice_set_header(o, "batch", place);
        }
    }
    free(topic);
}
