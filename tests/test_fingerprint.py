import json

import pytest

from shards import fingerprint
from shards.errors import SigmaError


def test_first_run_records_and_a_same_resume_passes(tmp_path):
    fingerprint.check(tmp_path, {"urls": "abc", "threshold": 5.0})
    assert json.loads((tmp_path / fingerprint.FILE).read_text()) == {"threshold": 5.0, "urls": "abc"}
    fingerprint.check(tmp_path, {"threshold": 5.0, "urls": "abc"})  # key order does not matter


def test_a_changed_resume_names_what_changed(tmp_path):
    fingerprint.check(tmp_path, {"urls": "abc", "threshold": 5.0, "model": "m"})
    with pytest.raises(SigmaError, match=r"made with another model, threshold \(see fingerprint.json\)"):
        fingerprint.check(tmp_path, {"urls": "abc", "threshold": 6.0, "model": "n"})
    with pytest.raises(SigmaError, match="another extra"):
        fingerprint.check(tmp_path, {"urls": "abc", "threshold": 5.0, "model": "m", "extra": 1})


def test_digests_see_content_and_listings_see_sizes(tmp_path):
    a = tmp_path / "a.parquet"
    a.write_bytes(b"x" * 10)
    d1 = fingerprint.file_digest(a)
    a.write_bytes(b"y" * 10)
    assert fingerprint.file_digest(a) != d1
    l1 = fingerprint.listing([a])
    a.write_bytes(b"y" * 11)
    assert fingerprint.listing([a]) != l1
