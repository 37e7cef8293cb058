-- 0014_usage_recent_index: the request log (GET /admin/logs?kind=requests) pages through every
-- user's records newest first by (created_at, id); the BRIN index of 0004 cannot give that order,
-- so an unfiltered page would sort the whole table.
CREATE INDEX usage_records_recent_idx ON usage_records (created_at DESC, id DESC);
