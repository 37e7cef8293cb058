-- 0007_plan_price_source: where a plan's Paddle price id came from, so that configuration and admins
-- never silently overwrite each other.
--
-- paddle_price_source:
--   'config' the id was copied from BG_PADDLE_PRICE_<PLAN> (bgctl migrate does that on every run);
--            a later run with another value replaces it;
--   'admin'  an admin set it (PUT /admin/plans/{id}) or an operator by hand before this migration;
--            configuration no longer touches it and bgctl migrate warns when they differ. Setting
--            paddle_price_id to null through the API hands the plan back to configuration.
--   NULL     no price id.
ALTER TABLE plans ADD COLUMN paddle_price_source text
    CHECK (paddle_price_source IN ('config', 'admin'));
-- Ids set with UPDATE before this migration (as 0005 told operators to) were set by a person.
UPDATE plans SET paddle_price_source = 'admin' WHERE paddle_price_id IS NOT NULL;
ALTER TABLE plans ADD CONSTRAINT plans_paddle_price_source_set
    CHECK ((paddle_price_id IS NULL) = (paddle_price_source IS NULL));
COMMENT ON COLUMN plans.paddle_price_source IS
    '''config'' (from BG_PADDLE_PRICE_<PLAN>), ''admin'' (set by an admin; configuration keeps off) or NULL.';
