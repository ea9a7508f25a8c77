/* The JSON grammar of RFC 8259, checked by recursive descent. */

#include "json.h"

#include <string.h>

#define MAX_DEPTH 128

typedef struct {
    const char *text;
    size_t len;
    size_t pos;
} cursor;

static bool value(cursor *c, int depth);

static void skip_ws(cursor *c) {
    while (c->pos < c->len && (c->text[c->pos] == ' ' || c->text[c->pos] == '\t' ||
                               c->text[c->pos] == '\n' || c->text[c->pos] == '\r')) {
        c->pos++;
    }
}

static bool eat(cursor *c, char ch) {
    if (c->pos < c->len && c->text[c->pos] == ch) {
        c->pos++;
        return true;
    }
    return false;
}

static bool is_hex(char ch) {
    return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F');
}

static bool string(cursor *c) {
    if (!eat(c, '"')) {
        return false;
    }
    while (c->pos < c->len) {
        unsigned char ch = (unsigned char)c->text[c->pos++];
        if (ch == '"') {
            return true;
        }
        if (ch < 0x20) {
            return false;
        }
        if (ch == '\\') {
            if (c->pos >= c->len) {
                return false;
            }
            char esc = c->text[c->pos++];
            if (esc == 'u') {
                for (int i = 0; i < 4; i++) {
                    if (c->pos >= c->len || !is_hex(c->text[c->pos++])) {
                        return false;
                    }
                }
            } else if (!strchr("\"\\/bfnrt", esc)) {
                return false;
            }
        }
    }
    return false;
}

static bool digits(cursor *c) {
    size_t start = c->pos;
    while (c->pos < c->len && c->text[c->pos] >= '0' && c->text[c->pos] <= '9') {
        c->pos++;
    }
    return c->pos > start;
}

static bool number(cursor *c) {
    eat(c, '-');
    if (eat(c, '0')) {
        /* no leading zeros */
    } else if (!digits(c)) {
        return false;
    }
    if (eat(c, '.') && !digits(c)) {
        return false;
    }
    if (c->pos < c->len && (c->text[c->pos] == 'e' || c->text[c->pos] == 'E')) {
        c->pos++;
        if (!eat(c, '+')) {
            eat(c, '-');
        }
        if (!digits(c)) {
            return false;
        }
    }
    return true;
}

static bool literal(cursor *c, const char *word) {
    size_t n = strlen(word);
    if (c->len - c->pos >= n && memcmp(c->text + c->pos, word, n) == 0) {
        c->pos += n;
        return true;
    }
    return false;
}

/* An object's members; with `info`, records the top level's. */
static bool object(cursor *c, int depth, const char *name, json_object_info *info) {
    if (!eat(c, '{')) {
        return false;
    }
    skip_ws(c);
    if (eat(c, '}')) {
        return true;
    }
    do {
        skip_ws(c);
        size_t key_start = c->pos + 1;
        if (!string(c)) {
            return false;
        }
        size_t key_len = c->pos - 1 - key_start;
        skip_ws(c);
        if (!eat(c, ':')) {
            return false;
        }
        skip_ws(c);
        size_t value_start = c->pos;
        if (!value(c, depth + 1)) {
            return false;
        }
        if (info != NULL) {
            info->members++;
            if (strlen(name) == key_len && memcmp(c->text + key_start, name, key_len) == 0) {
                info->value = c->text + value_start;
                info->value_len = c->pos - value_start;
            }
        }
        skip_ws(c);
    } while (eat(c, ','));
    return eat(c, '}');
}

static bool array(cursor *c, int depth) {
    if (!eat(c, '[')) {
        return false;
    }
    skip_ws(c);
    if (eat(c, ']')) {
        return true;
    }
    do {
        skip_ws(c);
        if (!value(c, depth + 1)) {
            return false;
        }
        skip_ws(c);
    } while (eat(c, ','));
    return eat(c, ']');
}

static bool value(cursor *c, int depth) {
    if (depth > MAX_DEPTH || c->pos >= c->len) {
        return false;
    }
    switch (c->text[c->pos]) {
    case '{': return object(c, depth, NULL, NULL);
    case '[': return array(c, depth);
    case '"': return string(c);
    case 't': return literal(c, "true");
    case 'f': return literal(c, "false");
    case 'n': return literal(c, "null");
    default: return number(c);
    }
}

bool json_object_scan(const char *text, size_t len, const char *name, json_object_info *info) {
    cursor c = {text, len, 0};
    info->members = 0;
    info->value = NULL;
    info->value_len = 0;
    skip_ws(&c);
    if (!object(&c, 0, name, info)) {
        return false;
    }
    skip_ws(&c);
    return c.pos == c.len;
}

bool json_is_integer(const char *value, size_t len) {
    size_t i = (len > 0 && value[0] == '-') ? 1 : 0;
    if (i == len) {
        return false;
    }
    for (; i < len; i++) {
        if (value[i] < '0' || value[i] > '9') {
            return false;
        }
    }
    return true;
}
