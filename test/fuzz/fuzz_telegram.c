/*
 * libFuzzer target for what the Telegram channel takes from the network: webhook updates
 * (bg_tg_update_parse), downloaded text files (bg_tg_text_file_message, bg_tg_is_text_file) and
 * the cutting of long texts into messages (bg_tg_split).
 *
 * Each input is read as all three. A parsed update must hold what the bot relies on: every string
 * field terminated inside its array, the text at most BG_TG_IN_TEXT_MAX bytes, a known content, a
 * non-negative file size, a command only for a command. A text file's message must be UTF-8 that
 * ends with the fence it opened, with no longer run of backticks inside; a refused one must leave
 * the buffer as it was. A cut must be a whole, non-empty prefix that never splits a character and
 * never passes the limit. Any breach aborts, which libFuzzer reports as a crash; ASan and UBSan
 * catch the rest. Seeds: test/fixtures/telegram (the real payloads), copied by `make fuzz`.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bg/buf.h"
#include "bg/err.h"
#include "bg/json.h"
#include "bg/telegram.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define TERMINATED(a) (memchr((a), '\0', sizeof(a)) != NULL)

static void check_update(const char *s, size_t size)
{
    bg_tg_update_t u;
    const char *desc = NULL;
    if (bg_tg_update_parse(s, size, &u, &desc) != 0)
        return;
    if (!TERMINATED(u.chat_type) || !TERMINATED(u.first_name) || !TERMINATED(u.username) ||
        !TERMINATED(u.language_code) || !TERMINATED(u.command) || !TERMINATED(u.callback_id) ||
        !TERMINATED(u.callback_data) || !TERMINATED(u.file_id) || !TERMINATED(u.mime_type) ||
        !TERMINATED(u.file_name))
        abort();
    if (u.text != NULL && strlen(u.text) > BG_TG_IN_TEXT_MAX)
        abort();
    if (u.file_size < 0 || (int)u.content < BG_TG_NONE || u.content > BG_TG_VIDEO)
        abort();
    if (u.content == BG_TG_COMMAND && u.command[0] == '\0')
        abort();
    (void)bg_tg_is_text_file(u.mime_type, u.file_name);
    bg_tg_update_dispose(&u);
}

static void check_text_file(const uint8_t *data, size_t size)
{
    bg_buf_t out;
    bg_buf_init(&out, 2 * size + 4096);
    int rc = bg_tg_text_file_message("What is in it?", "notes.txt", data, size, &out);
    if (rc == 0) {
        if (out.base == NULL || !bg_json_utf8_is_valid(out.base, out.len))
            abort();
        /* the last line is the fence; the first fence line is the same, after the name */
        const char *nl = memchr(out.base, '\n', out.len);
        const char *head = strstr(out.base, "notes.txt:\n");
        if (nl == NULL || head == NULL)
            abort();
        const char *fence = head + strlen("notes.txt:\n");
        size_t flen = strspn(fence, "`");
        if (flen < 3 || fence[flen] != '\n' || out.len < flen ||
            strspn(out.base + out.len - flen, "`") != flen || out.base[out.len - flen - 1] != '\n')
            abort();
        /* no run of backticks in the quoted text is as long as the fence */
        size_t run = 0;
        for (const char *p = fence + flen; p < out.base + out.len - flen; p++) {
            run = *p == '`' ? run + 1 : 0;
            if (run >= flen)
                abort();
        }
    } else if (rc != BG_ERR_INVALID || out.len != 0) {
        abort();
    }
    bg_buf_dispose(&out);
}

static void check_split(const char *s, size_t size)
{
    if (size == 0 || !bg_json_utf8_is_valid(s, size))
        return;
    static const size_t limits[] = {1, 2, 7, 64, BG_TG_TEXT_MAX};
    for (size_t i = 0; i < sizeof(limits) / sizeof(limits[0]); i++) {
        size_t n = bg_tg_split(s, size, limits[i]);
        if (n == 0 || n > size || (n < size && ((unsigned char)s[n] & 0xC0) == 0x80))
            abort();
        /* over the limit only when one character alone is (a 4-byte one against a limit of 1) */
        if (bg_tg_utf16_len(s, n) > limits[i] && bg_tg_utf16_len(s, n) > 2)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    check_update(s, size);
    check_text_file(data, size);
    check_split(s, size);
    return 0;
}
