/*
 * Shared authentication state in Redis: what every edge instance must know at once about sessions
 * and users, keyed under the user's shard tag so one MGET reads all of it.
 *
 *   bg:{s<N>}:sess:<sid>:rev    set when a session is revoked (logout, reuse, admin); expires after
 *                               the access-token lifetime, when no token of it can be alive anyway
 *   bg:{s<N>}:user:<uid>:nbf    milliseconds since the epoch: access tokens issued before (by the
 *                               time in their jti, a UUIDv7) are refused
 *                               (set when a user is disabled, deleted or changes role)
 *   bg:{s<N>}:user:<uid>:locale the user's locale, so the next message is in the new language
 */
#ifndef BG_AUTHSTATE_H
#define BG_AUTHSTATE_H

#include "bg/common.h"

/** Writes the key of a revoked session. Returns 0 or BG_ERR_TOO_LARGE. */
BG_MUSTCHECK int bg_authstate_key_revoked(char *out, size_t outlen, int shard, const char *sid);
/** Writes the key of a user's not-before time. */
BG_MUSTCHECK int bg_authstate_key_nbf(char *out, size_t outlen, int shard, const char *user_id);
/** Writes the key of a user's locale. */
BG_MUSTCHECK int bg_authstate_key_locale(char *out, size_t outlen, int shard, const char *user_id);

#endif
