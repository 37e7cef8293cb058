-- The ready agent `assistant` (0006) serves every channel: the web chat, Telegram bots bound to
-- it, and the OpenAI-compatible API (where it is the model "assistant"). Only an agent still on
-- the seeded value is changed, so an operator's own choice of channels is kept.
UPDATE agents
   SET channels = ARRAY['web', 'telegram', 'api'], updated_at = now()
 WHERE id = '00000000-0000-4000-8000-00000000a550'
   AND channels = ARRAY['web'];
