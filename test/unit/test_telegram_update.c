/*
 * The Telegram channel's pure pieces (bg/telegram.h): every fixture of real Bot API payloads
 * (test/fixtures/telegram/, copied from library test suites) parses into what the bot acts on;
 * long replies split on sensible boundaries without breaking a character or passing 4,096 UTF-16
 * units; tokens give their slug; webhook secrets match only themselves.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/telegram.h"

#define FIXTURES BGT_SOURCE_DIR "/test/fixtures/telegram/"

static char *slurp(const char *name, size_t *len)
{
    char path[512];
    snprintf(path, sizeof(path), "%s%s", FIXTURES, name);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    char *buf = malloc(1 << 20);
    cr_assert_not_null(buf);
    *len = fread(buf, 1, (1 << 20) - 1, f);
    buf[*len] = '\0';
    (void)fclose(f);
    return buf;
}

static void parse(const char *name, bg_tg_update_t *u)
{
    size_t len;
    char *text = slurp(name, &len);
    const char *desc = NULL;
    int rc = bg_tg_update_parse(text, len, u, &desc);
    free(text);
    cr_assert_eq(rc, 0, "%s: %s (%s)", name, bg_strerror(rc), desc != NULL ? desc : "");
}

Test(telegram_update, text_message)
{
    bg_tg_update_t u;
    parse("update_text.json", &u);
    cr_expect_eq(u.update_id, 892252934);
    cr_expect_eq(u.kind, BG_TG_MESSAGE);
    cr_expect_eq(u.content, BG_TG_TEXT);
    cr_expect(u.has_chat && u.chat_id == 218485655);
    cr_expect_str_eq(u.chat_type, "private");
    cr_expect(u.has_from && u.from_id == 218485655);
    cr_expect_str_eq(u.first_name, "Waffle");
    cr_expect_str_eq(u.language_code, "en");
    cr_expect_str_eq(u.text, "hello there");
    bg_tg_update_dispose(&u);
}

Test(telegram_update, group_command_with_64_bit_chat)
{
    bg_tg_update_t u;
    parse("update_group_command.json", &u);
    cr_expect_eq(u.content, BG_TG_COMMAND);
    cr_expect_str_eq(u.command, "report");
    cr_expect_eq(u.chat_id, -1001293752024LL);
    cr_expect_str_eq(u.chat_type, "supergroup");
    cr_expect_eq(u.from_id, 5964236329LL);
    cr_expect_eq(u.thread_id, 134545);
    bg_tg_update_dispose(&u);
}

Test(telegram_update, media_and_edits)
{
    bg_tg_update_t u;
    parse("update_photo.json", &u);
    cr_expect_eq(u.content, BG_TG_PHOTO);
    cr_expect_str_eq(u.language_code, "", "language_code null reads as absent");
    bg_tg_update_dispose(&u);
    parse("update_document.json", &u);
    cr_expect_eq(u.content, BG_TG_DOCUMENT);
    cr_expect_str_eq(u.text, "Read my document", "the caption is the text");
    bg_tg_update_dispose(&u);
    parse("update_voice.json", &u);
    cr_expect_eq(u.content, BG_TG_VOICE);
    cr_expect_str_eq(u.language_code, "ru");
    bg_tg_update_dispose(&u);
    parse("update_edited.json", &u);
    cr_expect_eq(u.kind, BG_TG_EDITED);
    bg_tg_update_dispose(&u);
}

Test(telegram_update, callback_queries)
{
    bg_tg_update_t u;
    parse("update_callback_inline.json", &u);
    cr_expect_eq(u.kind, BG_TG_CALLBACK);
    cr_expect_str_eq(u.callback_id, "id");
    cr_expect_str_eq(u.callback_data, "some_data");
    cr_expect_not(u.has_chat, "an inline message has no chat");
    bg_tg_update_dispose(&u);
    parse("update_callback_inaccessible.json", &u);
    cr_expect_str_eq(u.callback_id, "12345");
    cr_expect(u.has_chat && u.chat_id == 9999999999LL);
    cr_expect(u.message_inaccessible, "date 0 marks an inaccessible message");
    bg_tg_update_dispose(&u);
}

Test(telegram_update, refuses_what_is_not_an_update)
{
    bg_tg_update_t u;
    const char *desc = NULL;
    cr_expect_eq(bg_tg_update_parse("[]", 2, &u, &desc), BG_ERR_INVALID);
    cr_expect_eq(bg_tg_update_parse("{\"message\":{}}", 14, &u, &desc), BG_ERR_INVALID);
    cr_expect_eq(bg_tg_update_parse("{\"update_id\":-1}", 16, &u, &desc), BG_ERR_INVALID);
    cr_expect_eq(bg_tg_update_parse("{\"update_id\":1", 14, &u, &desc), BG_ERR_INVALID);
    const char *other = "{\"update_id\":7,\"inline_query\":{\"id\":\"1\"},\"future_field\":[1]}";
    cr_assert_eq(bg_tg_update_parse(other, strlen(other), &u, &desc), 0);
    cr_expect_eq(u.kind, BG_TG_OTHER, "unknown kinds are tolerated");
    bg_tg_update_dispose(&u);
    const char *cmd = "{\"update_id\":8,\"message\":{\"message_id\":1,\"chat\":{\"id\":5,\"type\":"
                      "\"private\"},\"from\":{\"id\":5,\"is_bot\":false,\"first_name\":\"A\"},"
                      "\"text\":\"/Start@MyBot hello\"}}";
    cr_assert_eq(bg_tg_update_parse(cmd, strlen(cmd), &u, &desc), 0);
    cr_expect_eq(u.content, BG_TG_COMMAND);
    cr_expect_str_eq(u.command, "start");
    bg_tg_update_dispose(&u);
}

Test(telegram_split, short_text_is_one_piece)
{
    cr_expect_eq(bg_tg_split("hello", 5, BG_TG_TEXT_MAX), 5);
}

Test(telegram_split, cuts_at_paragraphs_then_spaces)
{
    char text[10000];
    memset(text, 'a', sizeof(text));
    memcpy(text + 3000, "\n\n", 2);
    memcpy(text + 3500, " ", 1);
    size_t n = bg_tg_split(text, sizeof(text), BG_TG_TEXT_MAX);
    cr_expect_eq(n, 3002, "cut after the paragraph break, got %zu", n);
    text[3000] = 'a';
    text[3001] = 'a';
    n = bg_tg_split(text, sizeof(text), BG_TG_TEXT_MAX);
    cr_expect_eq(n, 3501, "cut after the space, got %zu", n);
    text[3500] = 'a';
    n = bg_tg_split(text, sizeof(text), BG_TG_TEXT_MAX);
    cr_expect_eq(n, 4096, "no boundary: a hard cut at the limit, got %zu", n);
}

Test(telegram_split, counts_utf16_units_and_keeps_characters_whole)
{
    /* "я" is 2 bytes and 1 unit; an emoji is 4 bytes and 2 units */
    char text[20000];
    size_t len = 0;
    for (int i = 0; i < 5000; i++) {
        memcpy(text + len, "я", 2);
        len += 2;
    }
    size_t n = bg_tg_split(text, len, BG_TG_TEXT_MAX);
    cr_expect_eq(n, 8192, "4096 Cyrillic letters fit, got %zu bytes", n);
    len = 0;
    for (int i = 0; i < 3000; i++) {
        memcpy(text + len, "\xF0\x9F\x98\x80", 4);
        len += 4;
    }
    n = bg_tg_split(text, len, BG_TG_TEXT_MAX);
    cr_expect_eq(n, 8192, "2048 emoji are 4096 units, got %zu bytes", n);
    cr_expect_eq(bg_tg_utf16_len(text, n), 4096);
}

Test(telegram_token, slug_and_secret)
{
    char slug[BG_TG_SLUG_SIZE];
    cr_expect_eq(bg_tg_token_slug("123456:ABC-DEF_ghi", slug), 0);
    cr_expect_str_eq(slug, "123456");
    cr_expect_eq(bg_tg_token_slug("123456", slug), BG_ERR_INVALID);
    cr_expect_eq(bg_tg_token_slug("12a:xyz", slug), BG_ERR_INVALID);
    cr_expect_eq(bg_tg_token_slug("123:", slug), BG_ERR_INVALID);
    cr_expect(bg_tg_secret_is_valid("s3cret_-X"));
    cr_expect_not(bg_tg_secret_is_valid("with space"));
    cr_expect_not(bg_tg_secret_is_valid(""));
    char hash[BG_CRYPTO_SHA256_HEX_LEN];
    bg_crypto_sha256_hex("s3cret", 6, hash);
    cr_expect(bg_tg_secret_matches("s3cret", 6, hash));
    cr_expect_not(bg_tg_secret_matches("s3cre", 5, hash));
    cr_expect_not(bg_tg_secret_matches("s3cret!", 7, hash));
}

Test(telegram_update, media_files_for_getfile)
{
    bg_tg_update_t u;
    /* a photo: the largest of its sizes, which Telegram gives without a mime type */
    parse("update_photo.json", &u);
    cr_expect_str_eq(u.file_id, "AgADAgADvKgxGxW80EtRgjrTaWNmy7UerQ4ABP6uRLtwe8Z8wZ4BAAEC");
    cr_expect_eq(u.file_size, 489108);
    cr_expect_str_eq(u.mime_type, "image/jpeg");
    bg_tg_update_dispose(&u);
    parse("update_voice.json", &u);
    cr_expect_str_eq(u.file_id, "AwADawAgADADy_JxS2gopIVIIxlhAg");
    cr_expect_eq(u.file_size, 4321);
    cr_expect_str_eq(u.mime_type, "audio/ogg");
    bg_tg_update_dispose(&u);
    parse("update_document.json", &u);
    cr_expect_eq(u.file_size, 21331);
    cr_expect_str_eq(u.text, "Read my document");
    cr_expect_str_eq(u.file_name, "test.docx");
    /* a Word document is not a text file, whatever its name would say */
    cr_expect_not(bg_tg_is_text_file(u.mime_type, u.file_name));
    bg_tg_update_dispose(&u);
    /* a negative or missing size is unknown, not trusted */
    const char *j = "{\"update_id\":1,\"message\":{\"message_id\":1,\"chat\":{\"id\":1,\"type\":"
                    "\"private\"},\"date\":1,\"photo\":[{\"file_id\":\"a\",\"file_size\":-5}]}}";
    const char *desc = NULL;
    cr_assert_eq(bg_tg_update_parse(j, strlen(j), &u, &desc), 0);
    cr_expect_eq(u.content, BG_TG_PHOTO);
    cr_expect_eq(u.file_size, 0);
    bg_tg_update_dispose(&u);
}

Test(telegram_link, codes_are_normalized_and_checked)
{
    char out[BG_TG_LINK_CODE_SIZE];
    cr_expect(bg_tg_link_code_normalize("K7QX2M9D", out));
    cr_expect_str_eq(out, "K7QX2M9D");
    cr_expect(bg_tg_link_code_normalize(" k7qx-2m9d ", out));
    cr_expect_str_eq(out, "K7QX2M9D");
    cr_expect(bg_tg_link_code_normalize("k7qx 2m9d", out));
    /* look-alikes are not in the alphabet, nor are other characters; the length is exact */
    cr_expect(!bg_tg_link_code_normalize("K7QX2M9O", out));
    cr_expect(!bg_tg_link_code_normalize("K7QX2M91", out));
    cr_expect(!bg_tg_link_code_normalize("K7QX2M9", out));
    cr_expect(!bg_tg_link_code_normalize("K7QX2M9DD", out));
    cr_expect(!bg_tg_link_code_normalize("K7QX'2M9D", out));
    cr_expect(!bg_tg_link_code_normalize("", out));
    cr_expect(!bg_tg_link_code_normalize(NULL, out));
}

Test(telegram_media, data_urls_are_standard_base64)
{
    bg_buf_t b;
    bg_buf_init(&b, 1024);
    cr_assert_eq(bg_tg_data_url("image/jpeg", "\xff\xd8\xff", 3, &b), 0);
    cr_expect_str_eq(b.base, "data:image/jpeg;base64,/9j/");
    bg_buf_reset(&b);
    cr_assert_eq(bg_tg_data_url("image/png", "ab", 2, &b), 0);
    cr_expect_str_eq(b.base, "data:image/png;base64,YWI=");
    bg_buf_reset(&b);
    cr_assert_eq(bg_tg_data_url("image/png", "a", 1, &b), 0);
    cr_expect_str_eq(b.base, "data:image/png;base64,YQ==");
    bg_buf_dispose(&b);
    /* a full buffer is an error, not a cut URL */
    bg_buf_init(&b, 30);
    cr_expect_eq(bg_tg_data_url("image/jpeg", "0123456789012345678901234567890123456789", 40, &b),
                 BG_ERR_TOO_LARGE);
    bg_buf_dispose(&b);
}

Test(telegram_media, text_files_are_told_by_mime_type_then_by_name)
{
    cr_expect(bg_tg_is_text_file("text/plain", "notes"));
    cr_expect(bg_tg_is_text_file("TEXT/CSV", "a.bin"));
    cr_expect(bg_tg_is_text_file("application/json", NULL));
    cr_expect(bg_tg_is_text_file("application/vnd.api+json", ""));
    cr_expect(bg_tg_is_text_file("image/svg+xml", "logo.svg"));
    cr_expect(bg_tg_is_text_file("application/x-yaml", "ci.yml"));
    /* no mime type, or a generic one: the extension decides, in any case */
    cr_expect(bg_tg_is_text_file("", "README.MD"));
    cr_expect(bg_tg_is_text_file(NULL, "main.c"));
    cr_expect(bg_tg_is_text_file("application/octet-stream", "app.log"));
    cr_expect_not(bg_tg_is_text_file("application/octet-stream", "photo.jpeg"));
    cr_expect_not(bg_tg_is_text_file("", "Makefile"));
    cr_expect_not(bg_tg_is_text_file("", ".txt"));
    cr_expect_not(bg_tg_is_text_file("", "archive.txt.gz"));
    /* a mime type that names a binary kind is believed over the name */
    cr_expect_not(bg_tg_is_text_file("application/pdf", "paper.txt"));
    cr_expect_not(bg_tg_is_text_file("application/zip", "src.py"));
}

Test(telegram_media, a_text_file_is_quoted_under_the_caption)
{
    bg_buf_t b;
    bg_buf_init(&b, 4096);
    /* the byte order mark goes, CR LF becomes LF, the text stays byte for byte otherwise */
    static const char csv[] =
        "\xef\xbb\xbf"
        "city,revenue\r\n\xd0\x9c\xd0\xbe\xd1\x81\xd0\xba\xd0\xb2\xd0\xb0,42\r\n";
    cr_assert_eq(bg_tg_text_file_message("Sum it up", "q3.csv", csv, sizeof(csv) - 1, &b), 0);
    cr_expect_str_eq(b.base, "Sum it "
                             "up\n\nq3.csv:\n```\ncity,"
                             "revenue\n\xd0\x9c\xd0\xbe\xd1\x81\xd0\xba\xd0\xb2\xd0\xb0,42\n```");
    /* no caption, no trailing newline, a fence in the text: the outer fence is longer */
    bg_buf_reset(&b);
    static const char md[] = "Run:\n````sh\nmake\n````";
    cr_assert_eq(bg_tg_text_file_message(NULL, "HOW\nTO.md", md, sizeof(md) - 1, &b), 0);
    cr_expect_str_eq(b.base, "HOW_TO.md:\n`````\nRun:\n````sh\nmake\n````\n`````");
    /* an empty file and a nameless one are quoted as they are */
    bg_buf_reset(&b);
    cr_assert_eq(bg_tg_text_file_message("", "", "", 0, &b), 0);
    cr_expect_str_eq(b.base, "file:\n```\n```");
    bg_buf_dispose(&b);
}

Test(telegram_media, what_is_not_utf8_text_is_refused)
{
    bg_buf_t b;
    bg_buf_init(&b, 4096);
    /* UTF-16 (NULs), Latin-1, a control character, a truncated sequence */
    cr_expect_eq(bg_tg_text_file_message("q", "a.txt",
                                         "\xff\xfe"
                                         "h\0i\0",
                                         6, &b),
                 BG_ERR_INVALID);
    cr_expect_eq(bg_tg_text_file_message("q", "a.txt", "caf\xe9", 4, &b), BG_ERR_INVALID);
    cr_expect_eq(bg_tg_text_file_message("q", "a.txt", "bell\a", 5, &b), BG_ERR_INVALID);
    cr_expect_eq(bg_tg_text_file_message("q", "a.txt", "\xd0", 1, &b), BG_ERR_INVALID);
    cr_expect_eq(b.len, 0, "nothing is written for a refused file");
    /* tabs and form feeds are text */
    cr_expect_eq(bg_tg_text_file_message(NULL, "a.tsv", "a\tb\f", 4, &b), 0);
    bg_buf_dispose(&b);
    /* a full buffer is an error, not a cut message */
    bg_buf_init(&b, 16);
    cr_expect_eq(
        bg_tg_text_file_message(NULL, "a.txt", "0123456789012345678901234567890123456789", 40, &b),
        BG_ERR_TOO_LARGE);
    bg_buf_dispose(&b);
}
