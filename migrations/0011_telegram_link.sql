-- 0011_telegram_link: one-time codes that join a Telegram user to a web account (/link), and the
-- agent capability that decides whether a photo sent to a bot goes to the model (docs/telegram.md).
--
-- A code is shown once (POST /auth/telegram/link-code) and only its SHA-256 is kept. A user has at
-- most one code: asking for a new one replaces the old (the primary key). A code lives 10 minutes
-- and works once: the telegram worker locks the row, checks expires_at and used_at, and sets
-- used_at in the same transaction that moves the Telegram identity, so two /link messages with one
-- code cannot both succeed.
CREATE TABLE telegram_link_codes (
    user_id    uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    code_hash  text NOT NULL UNIQUE CHECK (code_hash ~ '^[0-9a-f]{64}$'),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE telegram_link_codes IS 'One-time /link codes (hashed), one per web user.';

-- Whether the agent's model takes images as input (OpenAI content parts with image_url). Off by
-- default: a model that does not accept images would fail the turn, so an operator turns it on
-- for the agents whose models do.
ALTER TABLE agents ADD COLUMN accepts_images boolean NOT NULL DEFAULT false;
