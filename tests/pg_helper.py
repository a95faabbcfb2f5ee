"""PostgreSQL for the tests: the throwaway cluster (kfresh.testing.pgcluster) and fault injection."""

from __future__ import annotations

from kfresh.testing.pgcluster import PgCluster, find_pg_bin

__all__ = ["DISK_FULL", "DISK_SPACE_BACK", "PgCluster", "find_pg_bin"]

# Fault injection: every INSERT into the change log fails the way a full disk makes it fail (SQLSTATE 53100),
# inside the real write transaction. DISK_SPACE_BACK removes it.
DISK_FULL = """
CREATE OR REPLACE FUNCTION kfresh_test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; END $$;
CREATE TRIGGER kfresh_test_disk_full BEFORE INSERT ON changes FOR EACH ROW EXECUTE FUNCTION kfresh_test_disk_full();
"""
DISK_SPACE_BACK = "DROP TRIGGER kfresh_test_disk_full ON changes"
