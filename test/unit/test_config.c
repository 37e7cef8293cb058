/*
 * Configuration: defaults, validation messages that name the variable, .env handling, and
 * .env.example kept in step with the table.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bg/config.h"
#include "bg/err.h"

static void clear_env(void)
{
    size_t n;
    const bg_config_var_t *vars = bg_config_vars(&n);
    for (size_t i = 0; i < n; i++)
        unsetenv(vars[i].name);
}

TestSuite(config, .init = clear_env);

Test(config, defaults_follow_design)
{
    bg_config_t cfg;
    char err[256];
    cr_assert_eq(bg_config_load(&cfg, NULL, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(cfg.http_port, 8080);
    cr_assert_eq(cfg.https_port, 8443);
    cr_assert_eq(cfg.shards, 16);
    cr_assert_str_eq(cfg.public_url, "http://127.0.0.1:8080");
    cr_assert_str_eq(cfg.supported_locales, "en,ru,es");
    cr_assert_str_eq(cfg.default_locale, "en");
    cr_assert_str_eq(cfg.telegram_api_url, "https://api.telegram.org");
    cr_assert_eq(cfg.log_level, BG_LOG_INFO);
    cr_assert_eq(cfg.log_format, BG_LOG_FORMAT_JSON);
    bg_config_dispose(&cfg);
}

static void expect_error(const char *name, const char *value, const char *fragment)
{
    bg_config_t cfg;
    char err[256] = "";
    setenv(name, value, 1);
    cr_assert_eq(bg_config_load(&cfg, NULL, err, sizeof(err)), BG_ERR_CONFIG, "%s=%s accepted",
                 name, value);
    cr_assert(strstr(err, name) != NULL, "message does not name %s: %s", name, err);
    cr_assert(strstr(err, fragment) != NULL, "message lacks \"%s\": %s", fragment, err);
    unsetenv(name);
}

Test(config, wrong_values_name_the_variable_and_the_expectation)
{
    expect_error("BG_HTTP_PORT", "eighty", "integer from 1 to 65535");
    expect_error("BG_HTTP_PORT", "70000", "integer from 1 to 65535");
    expect_error("BG_SHARDS", "0", "integer from 1");
    expect_error("BG_REDIS_URL", "http://x", "scheme redis");
    expect_error("BG_DATABASE_URL", "localhost", "postgresql");
    expect_error("BG_LOG_LEVEL", "loud", "debug|info|warn|error|off");
    expect_error("BG_LOG_FORMAT", "xml", "json|text");
    expect_error("BG_SUPPORTED_LOCALES", "en,,ru", "locale tags");
    expect_error("BG_DEFAULT_LOCALE", "de", "BG_SUPPORTED_LOCALES");
    expect_error("BG_JWT_SECRET", "short", "32 bytes");
    expect_error("BG_TLS_CERT", "/tmp/cert.pem", "set together");
}

Test(config, environment_wins_over_dotenv_and_dotenv_over_defaults)
{
    char path[] = "/tmp/bg_cfg_XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fprintf(f,
            "# comment\nexport BG_HTTP_PORT=9090\nBG_HTTPS_PORT='9443'\nBG_LOG_FORMAT=\"text\"\n");
    fclose(f);
    setenv("BG_HTTP_PORT", "7070", 1);
    bg_config_t cfg;
    char err[256];
    cr_assert_eq(bg_config_load(&cfg, path, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(cfg.http_port, 7070);
    cr_assert_eq(cfg.https_port, 9443);
    cr_assert_eq(cfg.log_format, BG_LOG_FORMAT_TEXT);
    bg_config_dispose(&cfg);
    unlink(path);
}

Test(config, malformed_dotenv_line_is_reported_with_its_line_number)
{
    char path[] = "/tmp/bg_cfg_XXXXXX";
    int fd = mkstemp(path);
    FILE *f = fdopen(fd, "w");
    fprintf(f, "BG_HTTP_PORT=9090\nthis is not an assignment\n");
    fclose(f);
    bg_config_t cfg;
    char err[256] = "";
    cr_assert_eq(bg_config_load(&cfg, path, err, sizeof(err)), BG_ERR_CONFIG);
    cr_assert(strstr(err, ":2:") != NULL, "%s", err);
    unlink(path);
}

Test(config, env_example_documents_every_variable)
{
    FILE *f = fopen(BGT_SOURCE_DIR "/.env.example", "r");
    cr_assert_not_null(f, ".env.example is missing");
    static char text[65536];
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    text[n] = '\0';
    fclose(f);
    size_t count;
    const bg_config_var_t *vars = bg_config_vars(&count);
    for (size_t i = 0; i < count; i++) {
        char needle[96];
        snprintf(needle, sizeof(needle), "# %s=", vars[i].name);
        cr_expect(strstr(text, needle) != NULL, ".env.example does not document %s", vars[i].name);
    }
}

Test(config, list_membership)
{
    cr_assert(bg_config_list_has("en,ru,es", "ru"));
    cr_assert(bg_config_list_has("en, ru", "ru"));
    cr_assert_not(bg_config_list_has("en,ru", "r"));
    cr_assert_not(bg_config_list_has(NULL, "en"));
}
