/* A small JSON checker: enough to tell whether a payload is one JSON
 * object and to find one of its top-level members. */
#ifndef ENRICH_JSON_H
#define ENRICH_JSON_H

#include <stdbool.h>
#include <stddef.h>

typedef struct {
    /* Top-level members of the object. */
    size_t members;
    /* The raw text of the member asked for, or NULL if it is absent. */
    const char *value;
    size_t value_len;
} json_object_info;

/* True if text[0..len) is exactly one JSON object (surrounding whitespace
 * allowed); fills `info`, looking up the top-level member `name`. */
bool json_object_scan(const char *text, size_t len, const char *name, json_object_info *info);

/* True if the raw JSON value is an integer (no fraction or exponent). */
bool json_is_integer(const char *value, size_t len);

#endif
