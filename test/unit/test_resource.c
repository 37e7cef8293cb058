/*
 * The files compiled into the binaries (bg/resource.h): the table is sorted and complete, and the
 * SHA-1 the build wrote for each file is the SHA-1 of what was embedded, which is the name Redis
 * gives a script (EVALSHA finds admit.lua by it without hashing it on every call).
 */
#include <criterion/criterion.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

#include "bg/redis.h"
#include "bg/resource.h"

extern const bg_resource_t bg__resources[];
extern const unsigned bg__resources_count;

static void sha1_hex(const char *data, size_t len, char out[41])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    cr_assert_eq(EVP_Digest(data, len, md, &mdlen, EVP_sha1(), NULL), 1);
    cr_assert_eq(mdlen, 20);
    for (unsigned i = 0; i < 20; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

Test(resource, every_embedded_file_carries_its_own_sha1)
{
    cr_assert_gt(bg__resources_count, 10);
    size_t scripts = 0;
    for (unsigned i = 0; i < bg__resources_count; i++) {
        const bg_resource_t *r = &bg__resources[i];
        cr_assert_not_null(r->sha1, "%s", r->name);
        char want[41];
        sha1_hex(r->data, r->len, want);
        cr_expect_str_eq(r->sha1, want, "%s", r->name);
        cr_expect_eq(strlen(r->data), r->len, "%s holds a NUL", r->name);
        if (i > 0)
            cr_expect_lt(strcmp(bg__resources[i - 1].name, r->name), 0, "not sorted at %s",
                         r->name);
        if (strncmp(r->name, "lua/", 4) == 0) {
            scripts++;
            /* what EVALSHA is sent for the script */
            char sha[41];
            cr_assert_eq(bg__redis_script_find(r->name, sha), r);
            cr_expect_str_eq(sha, want, "%s", r->name);
        }
    }
    cr_expect_gt(scripts, 3);
    char sha[41] = "x";
    cr_expect_null(bg__redis_script_find("lua/none.lua", sha));
    cr_expect_str_eq(sha, "");
}
