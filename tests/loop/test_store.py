import time

import pytest
from sqlalchemy.exc import IntegrityError

from loop import store


@pytest.fixture()
def engine(tmp_path):
    return store.make_engine(f"sqlite:///{tmp_path / 's.db'}")


def _compounds(n, offset=0):
    return [dict(compound_id=f"C{i}", name=f"c{i}", smiles="C" * (1 + i % 5), inchikey=f"KEY{i:08d}",
                 fp_row=i, source="t", added_at=store.utcnow()) for i in range(offset, offset + n)]


def test_bulk_insert_100k_rows_is_fast(engine):
    from sqlmodel import Session

    rows = _compounds(100_000)
    start = time.process_time()
    with Session(engine) as session:
        store.bulk_insert(session, store.Compound, rows)
        session.commit()
    elapsed = time.process_time() - start
    with Session(engine) as session:
        assert store.count(session, store.Compound) == 100_000
        found = store.existing_values(session, store.Compound.inchikey, ["KEY00000005", "nope", "KEY00099999"])
    assert found == {"KEY00000005", "KEY00099999"}
    assert elapsed < 20, f"bulk insert of 1e5 rows took {elapsed:.1f} s"


@pytest.mark.parametrize("n_stored", [0, 30, 20_000])
def test_existing_values_same_whether_it_scans_the_table_or_queries_chunks(engine, n_stored):
    from sqlmodel import Session

    with Session(engine) as session:
        store.bulk_insert(session, store.Compound, _compounds(n_stored))
        session.commit()
    asked = [f"KEY{i:08d}" for i in range(0, 30_000, 3)] + ["nope"]  # 10,001 values: above the scan bound
    assert len(asked) > store.EXISTING_SCAN_MIN_VALUES
    with Session(engine) as session:
        found = store.existing_values(session, store.Compound.inchikey, asked)
        chunked = set()
        for start in range(0, len(asked), 900):  # the chunked query on its own
            chunked |= store.existing_values(session, store.Compound.inchikey, asked[start:start + 900])
    assert found == chunked == {k for k in asked if k < f"KEY{n_stored:08d}"}


def test_unique_inchikey_enforced_and_rolled_back(engine):
    from sqlmodel import Session

    with Session(engine) as session:
        store.bulk_insert(session, store.Compound, _compounds(3))
        session.commit()
    with Session(engine) as session, pytest.raises(IntegrityError):
        store.bulk_insert(session, store.Compound, _compounds(2, offset=10) + _compounds(1))
        session.commit()
    with Session(engine) as session:
        assert store.count(session, store.Compound) == 3
