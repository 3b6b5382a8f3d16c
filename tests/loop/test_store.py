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
