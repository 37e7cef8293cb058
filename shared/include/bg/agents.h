/*
 * Agents and their prompts on blocking libpq: listing and loading agents, resolving the prompt
 * version an agent uses, publishing prompt versions (and rolling back by publishing an old one
 * again), and creating, changing and deleting agents with an audit row for each change; also which
 * agents a user may use on a channel (visibility, channels and resource_access policies, in one
 * place for the web chat, the OpenAI-compatible API and Telegram) and who may manage them. Shared
 * by the edge (on its thread pool), the llm worker and bgctl.
 *
 * Prompt versions are immutable (the database refuses UPDATE and DELETE): publishing inserts
 * version max + 1 and makes it the prompt's current_version; a rollback publishes a copy of an
 * older version as the newest, so history only ever grows and every conversation can name the exact
 * text it ran with. An agent either pins a version (prompt_version) or follows the prompt's current
 * one (prompt_version 0 here, NULL in the table).
 *
 * Every function takes a connection it does not own; those that write more than one row run in a
 * transaction of their own (so the connection must not be inside one). Errors: BG_ERR_NOT_FOUND
 * (no such live row; malformed ids too), BG_ERR_CONFLICT (slug taken in that organization),
 * BG_ERR_INVALID (a value refused: err, when given, names the field), BG_ERR_UNAVAILABLE (Postgres
 * down), other bg_pg_exec() codes.
 */
#ifndef BG_AGENTS_H
#define BG_AGENTS_H

#include <libpq-fe.h>

#include "bg/accounts.h"
#include "bg/common.h"
#include "bg/prompt.h"

#define BG_AGENT_ID_SIZE 37            /**< uuid text + NUL */
#define BG_AGENT_SLUG_SIZE 64          /**< [a-z0-9][a-z0-9-]{0,62} + NUL */
#define BG_AGENT_NAME_SIZE 801         /**< 200 characters of up to 4 bytes + NUL */
#define BG_AGENT_DESCRIPTION_SIZE 8001 /**< 2000 characters of up to 4 bytes + NUL */
#define BG_AGENT_MODEL_SIZE 257        /**< model and provider names, bytes + NUL */
#define BG_AGENT_TIME_SIZE 32          /**< RFC 3339 UTC text */
#define BG_AGENT_LIST_MAX 1000         /**< most agents one list returns */
#define BG_AGENT_MAX_TOKENS_MAX 1000000
#define BG_AGENT_CACHE_TTL_MAX 2592000 /**< 30 days */

/** Channels an agent may be used on (bit set). */
enum {
    BG_AGENT_CHANNEL_WEB = 1u << 0,
    BG_AGENT_CHANNEL_TELEGRAM = 1u << 1,
    BG_AGENT_CHANNEL_API = 1u << 2,
    BG_AGENT_CHANNEL_ALL = (1u << 3) - 1
};

/** One agent as stored. */
typedef struct bg_agent {
    char id[BG_AGENT_ID_SIZE];
    char organization_id[BG_AGENT_ID_SIZE]; /**< "" for a system agent */
    char slug[BG_AGENT_SLUG_SIZE];
    char name[BG_AGENT_NAME_SIZE];
    char description[BG_AGENT_DESCRIPTION_SIZE];
    char model[BG_AGENT_MODEL_SIZE];    /**< "" = the deployment's BG_LLM_MODEL */
    char provider[BG_AGENT_MODEL_SIZE]; /**< "" = the deployment's provider */
    char prompt_id[BG_AGENT_ID_SIZE];   /**< "" when the agent has no prompt */
    int prompt_version;                 /**< pinned version; 0 follows the prompt's current one */
    double temperature;                 /**< params.temperature; < 0 when not set */
    int64_t max_tokens;                 /**< params.max_tokens; 0 when not set */
    bg_memory_policy_t memory;
    bool cache_enabled;
    int cache_ttl_s;
    unsigned channels;   /**< BG_AGENT_CHANNEL_* bits */
    char visibility[16]; /**< "private", "organization", "public" */
    char status[16];     /**< "active", "disabled" */
    char created_at[BG_AGENT_TIME_SIZE];
    char updated_at[BG_AGENT_TIME_SIZE];
} bg_agent_t;

/** A list of agents. */
typedef struct bg_agent_list {
    bg_agent_t *items; /**< owned; count of them */
    size_t count;
} bg_agent_list_t;

/** Frees the items of a list (the list itself may be reused); accepts NULL. */
void bg_agent_list_dispose(bg_agent_list_t *list);

/**
 * Lists live agents, ordered by name then id, at most BG_AGENT_LIST_MAX:
 * - all: every agent that is not deleted, disabled ones included (administration);
 * - else the active ones user_id may see: public agents plus the agents of the organizations the
 *   user belongs to (user_id NULL: public agents only). Resource-access policies are applied by the
 *   caller on top.
 */
BG_MUSTCHECK int bg_agents_list(PGconn *c, const char *user_id, bool all, bg_agent_list_t *out);

/** Loads a live (not deleted) agent by id. */
BG_MUSTCHECK int bg_agents_get(PGconn *c, const char *agent_id, bg_agent_t *out);

/**
 * Loads a live agent by slug within an organization (organization_id NULL: the system agents).
 */
BG_MUSTCHECK int bg_agents_get_by_slug(PGconn *c, const char *organization_id, const char *slug,
                                       bg_agent_t *out);

/**
 * Lists the active agents user_id may use on channel (a BG_AGENT_CHANNEL_* bit; 0 = any): visible
 * to the user (public, or of one of the user's organizations), enabled on that channel, and allowed
 * by the resource_access policies that apply to the user (agent by slug or id, and the agent's
 * model; the model name is the agent's model, or "" when it uses the deployment default — then only
 * "*" rules about models apply). The rules that apply are those of the user, the user's
 * organizations and the plan of the user's live subscription (the plan the admission uses), and
 * global ones; user_id NULL or unknown: public agents under global rules only. Ordered as
 * bg_agents_list; dispose out after success.
 */
BG_MUSTCHECK int bg_agents_list_usable(PGconn *c, const char *user_id, unsigned channel,
                                       bg_agent_list_t *out);

/**
 * Loads one agent by id or slug (slug: a system agent or one of the user's organizations; an
 * organization's agent wins over a system agent of the same slug) that user_id may use on channel.
 * BG_ERR_NOT_FOUND when it does not exist or the user cannot see it (a disabled agent included);
 * BG_ERR_DENIED when a resource_access policy denies it or it is not enabled on that channel. The
 * rules are those of bg_agents_list_usable.
 */
BG_MUSTCHECK int bg_agents_get_usable(PGconn *c, const char *user_id, const char *id_or_slug,
                                      unsigned channel, bg_agent_t *out);

/** A prompt version as stored. */
typedef struct bg_prompt_version {
    char prompt_id[BG_AGENT_ID_SIZE];
    int version;
    char *definition;                /**< owned JSON text of the definition (see prompt.h) */
    char model[BG_AGENT_MODEL_SIZE]; /**< overrides the agent's model when not "" */
    char *params;                    /**< owned JSON object text */
    char *note;                      /**< owned */
    char created_at[BG_AGENT_TIME_SIZE];
} bg_prompt_version_t;

/** Frees what a version owns; accepts NULL; the struct may be reused. */
void bg_prompt_version_dispose(bg_prompt_version_t *v);

/**
 * Loads version `version` of a live prompt, or its current version when version is 0. A version
 * written before migration 0006 (no definition) comes back as {"system": template, "variables":
 * its defaults as string variables}. *out is zeroed first; dispose it after success.
 */
BG_MUSTCHECK int bg_prompts_get_version(PGconn *c, const char *prompt_id, int version,
                                        bg_prompt_version_t *out);

/**
 * Loads the prompt version agent_id uses: its pinned version, or the prompt's current one.
 * BG_ERR_NOT_FOUND when the agent is unknown or has no prompt.
 */
BG_MUSTCHECK int bg_agents_resolve_prompt(PGconn *c, const char *agent_id,
                                          bg_prompt_version_t *out);

/** Lists the version numbers of a prompt, newest first (at most max of them) into versions. */
BG_MUSTCHECK int bg_prompts_list_versions(PGconn *c, const char *prompt_id, int *versions,
                                          size_t max, size_t *count);

/**
 * Creates a prompt with def (borrowed) as its version 1, published. organization_id NULL makes a
 * system prompt. Writes the new id into prompt_id. Audited as "prompt.create".
 */
BG_MUSTCHECK int bg_prompts_create(PGconn *c, const char *organization_id, const char *name,
                                   const char *description, const bg_prompt_t *def,
                                   const bg_actor_t *actor, char prompt_id[BG_AGENT_ID_SIZE]);

/**
 * Publishes def (borrowed) as the next version of a live prompt and makes it current. model (NULL
 * or "": none) overrides agents' models; params_json (NULL: "{}") is a JSON object; note may be
 * NULL. Concurrent publishers are serialised on the prompt row, so numbers never collide. Sets
 * *version to the new number. Audited as "prompt.publish".
 */
BG_MUSTCHECK int bg_prompts_publish(PGconn *c, const char *prompt_id, const bg_prompt_t *def,
                                    const char *model, const char *params_json, const char *note,
                                    const bg_actor_t *actor, int *version);

/**
 * Rolls a prompt back to version from: publishes a copy of it (definition, template, model,
 * params) as the newest version, noted "rollback to v<from>", and makes that current. Sets
 * *version to the new number. BG_ERR_NOT_FOUND when the version does not exist. Audited as
 * "prompt.rollback".
 */
BG_MUSTCHECK int bg_prompts_rollback(PGconn *c, const char *prompt_id, int from,
                                     const bg_actor_t *actor, int *version);

/**
 * What to set on an agent. For bg_agents_create every field is used (NULL or negative: the schema's
 * default) and slug and name are required; for bg_agents_update NULL pointers and negative numbers
 * leave a field unchanged.
 */
typedef struct bg_agent_spec {
    const char *organization_id; /**< create only; NULL: a system agent */
    const char *slug;
    const char *name;
    const char *description;
    const char *model;
    const char *provider;
    const char *prompt_id; /**< "" removes the prompt; a new prompt resets a pin not given */
    int prompt_version;    /**< ≥ 1 pins, 0 follows the current version, < 0 unchanged */
    double temperature;    /**< 0..2; < 0 unchanged */
    int64_t max_tokens;    /**< 1..BG_AGENT_MAX_TOKENS_MAX; ≤ 0 unchanged */
    const bg_memory_policy_t *memory;
    int cache_enabled; /**< 0 off, 1 on, < 0 unchanged */
    int cache_ttl_s;   /**< 1..BG_AGENT_CACHE_TTL_MAX; ≤ 0 unchanged */
    unsigned channels; /**< BG_AGENT_CHANNEL_* bits; 0 unchanged */
    const char *visibility;
    const char *status;
} bg_agent_spec_t;

/** A spec that changes nothing (every field "unchanged"). */
void bg_agent_spec_init(bg_agent_spec_t *spec);

/**
 * Creates an agent from spec and returns it in out. Values are checked here first (err names the
 * field: "slug", "temperature", "memory.last_turns", "prompt_version", …). Audited as
 * "agent.create".
 */
BG_MUSTCHECK int bg_agents_create(PGconn *c, const bg_agent_spec_t *spec, const bg_actor_t *actor,
                                  bg_agent_t *out, bg_prompt_err_t *err);

/**
 * Changes the fields spec sets on a live agent and returns the new row. Audited as "agent.update"
 * with the names of the fields given ({"fields": [...]}); nothing is written when spec sets none.
 */
BG_MUSTCHECK int bg_agents_update(PGconn *c, const char *agent_id, const bg_agent_spec_t *spec,
                                  const bg_actor_t *actor, bg_agent_t *out, bg_prompt_err_t *err);

/**
 * Deletes a live agent. Soft (deleted_at): conversations and usage still name it, and its slug is
 * free again. Audited as "agent.delete".
 */
BG_MUSTCHECK int bg_agents_delete(PGconn *c, const char *agent_id, const bg_actor_t *actor);

/** A prompt as stored (its versions are bg_prompt_version_t). */
typedef struct bg_prompt_info {
    char id[BG_AGENT_ID_SIZE];
    char organization_id[BG_AGENT_ID_SIZE]; /**< "" for a system prompt */
    char name[BG_AGENT_NAME_SIZE];
    char description[BG_AGENT_DESCRIPTION_SIZE];
    int current_version; /**< 0 when none is published */
    char created_at[BG_AGENT_TIME_SIZE];
    char updated_at[BG_AGENT_TIME_SIZE];
} bg_prompt_info_t;

/** A list of prompts. */
typedef struct bg_prompt_list {
    bg_prompt_info_t *items; /**< owned; count of them */
    size_t count;
} bg_prompt_list_t;

/** Frees the items of a list (the list may be reused); accepts NULL. */
void bg_prompt_list_dispose(bg_prompt_list_t *list);

/** Loads a live (not deleted) prompt. */
BG_MUSTCHECK int bg_prompts_get(PGconn *c, const char *prompt_id, bg_prompt_info_t *out);

/** Lists the live prompts, ordered by name then id, at most BG_AGENT_LIST_MAX. */
BG_MUSTCHECK int bg_prompts_list(PGconn *c, bg_prompt_list_t *out);

/**
 * Who may manage which agents and prompts: a platform admin (users.role "admin", active) manages
 * all of them; an owner or admin of an organization manages that organization's. A personal
 * organization (the one every user gets at registration) does not count: it makes nobody an
 * administrator, so the admin API stays closed to ordinary users.
 */
typedef struct bg_agent_manager {
    bool platform_admin;
    char (*orgs)[BG_AGENT_ID_SIZE]; /**< owned; the organizations managed (lower-case uuids) */
    size_t norgs;
} bg_agent_manager_t;

/** Loads what user_id may manage into *out (dispose it after success). */
BG_MUSTCHECK int bg_agents_manager_load(PGconn *c, const char *user_id, bg_agent_manager_t *out);

/** Frees what a manager owns; accepts NULL. */
void bg_agents_manager_dispose(bg_agent_manager_t *m);

/** Returns whether m manages anything at all. */
bool bg_agents_manager_is_any(const bg_agent_manager_t *m);

/**
 * Returns whether m may manage what belongs to organization_id (NULL or "": the system's, which
 * only platform admins manage).
 */
bool bg_agents_manager_may(const bg_agent_manager_t *m, const char *organization_id);

/** Returns the channel bits of a comma-separated list ("web,telegram"); 0 when a name is unknown.
 */
unsigned bg_agent_channels_parse(const char *csv);

#endif
