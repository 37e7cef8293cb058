/*
 * Key names of the shared authentication state (see authstate.h).
 */
#include <stdio.h>

#include "bg/authstate.h"
#include "bg/err.h"

static int key(char *out, size_t outlen, int shard, const char *kind, const char *id,
               const char *suffix)
{
    int n = snprintf(out, outlen, "bg:{s%d}:%s:%s:%s", shard, kind, id, suffix);
    return n < 0 || (size_t)n >= outlen ? BG_ERR_TOO_LARGE : 0;
}

int bg_authstate_key_revoked(char *out, size_t outlen, int shard, const char *sid)
{
    return key(out, outlen, shard, "sess", sid, "rev");
}

int bg_authstate_key_nbf(char *out, size_t outlen, int shard, const char *user_id)
{
    return key(out, outlen, shard, "user", user_id, "nbf");
}

int bg_authstate_key_locale(char *out, size_t outlen, int shard, const char *user_id)
{
    return key(out, outlen, shard, "user", user_id, "locale");
}
