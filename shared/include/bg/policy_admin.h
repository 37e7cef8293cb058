/*
 * Administration of policy rules (table policy_rules): the rows behind /admin/policies, with their
 * audit records, and the listing of the users a rule's scope reaches, so a change can be compiled
 * into their admission state at once (bg/policy.h describes what rules mean).
 *
 * Blocking libpq, on a connection the caller owns. Inputs are checked by bg/policy.h before they
 * get here (bg_policy_rule_parse, bg_policy_scope_check); this module checks what only the database
 * knows (that a user or organization named by a scope exists) and writes. Errors: BG_ERR_NOT_FOUND
 * (no such rule), BG_ERR_INVALID (the scope names nothing; err filled), or a database error.
 */
#ifndef BG_POLICY_ADMIN_H
#define BG_POLICY_ADMIN_H

#include <libpq-fe.h>

#include "bg/accounts.h"
#include "bg/common.h"
#include "bg/policy.h"

#define BG_POLICY_ADMIN_LIST_MAX 1000 /**< rules in one list answer */
#define BG_POLICY_ADMIN_NAME_SIZE 801 /**< policy_rules.name: 200 characters */

/** A stored rule as the admin API shows it. */
typedef struct bg_policy_row {
    char id[BG_POLICY_ID_SIZE];
    char type[20];
    char scope[16];
    char scope_id[BG_POLICY_ID_SIZE]; /**< "" for global */
    char name[BG_POLICY_ADMIN_NAME_SIZE];
    char *body; /**< owned JSON object text */
    int32_t priority;
    bool enabled;
    char created_at[40]; /**< RFC 3339 UTC */
    char updated_at[40];
} bg_policy_row_t;

/** Frees what a row owns; accepts NULL. */
void bg_policy_row_dispose(bg_policy_row_t *row);

/** What to store: strings borrowed; scope_id NULL for global; body a valid rule body's text. */
typedef struct bg_policy_input {
    const char *type, *scope, *scope_id, *name, *body;
    int32_t priority;
    bool enabled;
} bg_policy_input_t;

/**
 * Checks that the scope of in names something that exists (a plan, a live user, an
 * organization). Returns 0, BG_ERR_INVALID with err->field "scope_id", or a database error.
 */
BG_MUSTCHECK int bg_policy_admin_scope_exists(PGconn *c, const bg_policy_input_t *in,
                                              bg_policy_verr_t *err);

/**
 * Lists rules, newest first, optionally of one type and/or scope (NULL: any); at most max into out
 * (each disposed by the caller). Returns 0 or a database error.
 */
BG_MUSTCHECK int bg_policy_admin_list(PGconn *c, const char *type, const char *scope,
                                      bg_policy_row_t *out, size_t max, size_t *count);

/** Reads one rule. BG_ERR_NOT_FOUND for an unknown or malformed id. */
BG_MUSTCHECK int bg_policy_admin_get(PGconn *c, const char *id, bg_policy_row_t *out);

/** Stores a new rule and its audit row ("policy.create") in one transaction; fills out. */
BG_MUSTCHECK int bg_policy_admin_create(PGconn *c, const bg_policy_input_t *in,
                                        const bg_actor_t *actor, bg_policy_row_t *out);

/**
 * Replaces every field of rule id, audited as "policy.update" with the old and new scope; fills
 * before (may be NULL) and out. BG_ERR_NOT_FOUND for an unknown id.
 */
BG_MUSTCHECK int bg_policy_admin_update(PGconn *c, const char *id, const bg_policy_input_t *in,
                                        const bg_actor_t *actor, bg_policy_row_t *before,
                                        bg_policy_row_t *out);

/** Deletes rule id, audited as "policy.delete"; fills before (may be NULL) with the deleted row. */
BG_MUSTCHECK int bg_policy_admin_delete(PGconn *c, const char *id, const bg_actor_t *actor,
                                        bg_policy_row_t *before);

/**
 * Lists the users a rule of scope/scope_id reaches, in user id order after after_id ("" for the
 * first page), at most max ids (BG_POLICY_ID_SIZE bytes each) into ids: user → that live user;
 * organization → its members; plan → users whose live subscription has that plan; global → every
 * user with a live subscription. *count < max means the last page.
 */
BG_MUSTCHECK int bg_policy_admin_affected(PGconn *c, const char *scope, const char *scope_id,
                                          const char *after_id, char (*ids)[BG_POLICY_ID_SIZE],
                                          size_t max, size_t *count);

#endif
