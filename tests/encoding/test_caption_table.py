"""encoding/caption_table.py: a caption table split into per-shard caption files by tasks (called here
directly, then through Ray), so the encode driver never reads a row or a curated key."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encoding import caption_table
from shards import atomic, captions, curated, reasons
from shards import format as fmt
from shards.errors import SigmaError
from tests.shards.synthetic import sample, write_curated

# Two curated shards; the second one's span [000000002, 000000011] overlaps the first's [000000001, 000000010],
# as when shards of two curation runs are encoded together.
SHARDS = [[sample(1, 64, 64), sample(10, 64, 64)], [sample(2, 64, 64), sample(11, 64, 64)]]


def caption_rows(keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"key": keys, "caption": [f"caption of {k}" for k in keys]})


@pytest.fixture
def shard_list(tmp_path) -> list[str]:
    shard_dir, _ = write_curated(tmp_path, SHARDS)
    return [str(p) for p in sorted(shard_dir.glob("*.tar"))]


def run_tasks(source, shard_list: list[str], work) -> None:
    """What prepare() runs on Ray, in this process."""
    spans = {s: caption_table.span(s) for s in shard_list}
    atomic.write_parquet(work / caption_table.SPANS, caption_table._spans_table(shard_list, spans))
    for piece in caption_table.slices(source):
        caption_table.split(piece, str(work))
    for s in shard_list:
        caption_table.merge(s, str(work), source.path)


def merged(work, shard: str) -> dict[str, str]:
    return {r["key"]: r["caption"] for r in pq.read_table(fmt.caption_file(work, shard)).to_pylist()}


def test_rows_go_to_the_shards_holding_their_keys(tmp_path, shard_list, monkeypatch):
    folder = tmp_path / "table"
    folder.mkdir()
    # a parquet of 4 row groups (split into 2 slices below) and a csv; keys in no order, some in no shard
    keys = ["000000011", "000000005", "000000001", "zzz"]
    pq.write_table(
        pa.Table.from_pandas(caption_rows(keys), preserve_index=False), folder / "a.parquet", row_group_size=1
    )
    caption_rows(["000000010", "000000002", "http://x/1.jpg"]).to_csv(folder / "b.csv", index=False)
    monkeypatch.setattr(caption_table, "SLICE_ROWS", 2)
    source = captions.resolve(folder, shard_list)
    assert [(p["id"], p["row_groups"]) for p in caption_table.slices(source)] == [
        ("00000-00000", (0, 2)),
        ("00000-00001", (2, 4)),
        ("00001-00000", None),
    ]
    assert caption_table.span(shard_list[0]) == ("000000001", "000000010")
    work = tmp_path / "work"
    run_tasks(source, shard_list, work)
    # 000000005 lies in both spans but in neither shard; 000000011 and 000000002 in the overlap
    assert merged(work, shard_list[0]) == {"000000001": "caption of 000000001", "000000010": "caption of 000000010"}
    assert merged(work, shard_list[1]) == {"000000002": "caption of 000000002", "000000011": "caption of 000000011"}
    assert json.loads((work / caption_table.PARTS / "00000-00000.json").read_text()) == dict(
        rows=2, example="000000011"
    )
    # the merged file reads back through the one caption reader, columns filled from the table's name
    row = captions.read_file(fmt.caption_file(work, shard_list[0])).to_dict("records")[0]
    assert (row["captioner"], row["status"], row["original_caption"]) == ("table:a.parquet", reasons.KEPT, None)


def test_a_key_given_twice_is_refused_naming_the_files(tmp_path, shard_list):
    folder = tmp_path / "table"
    folder.mkdir()
    caption_rows(["000000001", "000000002"]).to_json(folder / "a.jsonl", orient="records", lines=True)
    caption_rows(["000000011", "000000002"]).to_csv(folder / "b.csv", index=False)
    source = captions.resolve(folder, shard_list)
    with pytest.raises(SigmaError, match=r"^--captions .*table: key '000000002' has 2 caption rows \(in a, b\)"):
        run_tasks(source, shard_list, tmp_path / "work")


def test_a_corrupt_shard_keeps_the_rows_of_the_keys_read_before_the_fault(tmp_path, shard_list):
    with tarfile.open(shard_list[1]) as tar:
        cut = next(m.offset for m in tar if m.name.startswith("000000011."))
    Path(shard_list[1]).write_bytes(Path(shard_list[1]).read_bytes()[: cut + 100])  # a copy cut in a header
    with pytest.raises(curated.CorruptShard) as e:
        curated.keys(shard_list[1])
    assert e.value.keys == ["000000002"]  # read_shard reports these corrupt_shard, with their caption rows
    path = tmp_path / "t.csv"
    caption_rows(["000000002", "000000011"]).to_csv(path, index=False)
    run_tasks(captions.resolve(path), shard_list, tmp_path / "work")
    assert set(merged(tmp_path / "work", shard_list[1])) == {"000000002"}
    assert merged(tmp_path / "work", shard_list[0]) == {}


def test_prepare_runs_in_tasks_and_a_rerun_reuses_its_files(tmp_path, shard_list, ray_local, monkeypatch):
    path = tmp_path / "t.parquet"
    caption_rows(["000000001", "000000002", "000000010", "000000011"]).to_parquet(path)
    source = captions.resolve(path, shard_list)

    def driver_must_not(*a, **k):
        raise AssertionError("the driver read caption rows or curated keys")

    # the tasks run in Ray's worker processes, which import these modules afresh
    monkeypatch.setattr(captions, "read_file", driver_must_not)
    monkeypatch.setattr(curated, "keys", driver_must_not)
    encdir = tmp_path / "enc"
    work = caption_table.prepare(ray_local, source, shard_list, encdir).local  # a Loc: here on disk
    assert work.parent == encdir / caption_table.WORK
    assert sorted(p.name for p in work.glob("*.parquet")) == ["00000.parquet", "00001.parquet", "spans.parquet"]
    assert not (work / caption_table.PARTS).exists()  # the parts go once every shard's file is written
    assert set(merged(work, shard_list[1])) == {"000000002", "000000011"}
    before = {p: p.stat().st_mtime_ns for p in work.iterdir()}
    assert caption_table.prepare(ray_local, source, shard_list, encdir).local == work
    assert {p: p.stat().st_mtime_ns for p in work.iterdir()} == before
    # another table: another WORK, the old one removed
    caption_rows(["000000001"]).to_parquet(path)
    new = caption_table.prepare(ray_local, captions.resolve(path, shard_list), shard_list, encdir).local
    assert new != work and not work.exists() and set(merged(new, shard_list[0])) == {"000000001"}


def test_prepare_refuses_no_match_and_duplicates_in_one_line(tmp_path, shard_list, ray_local):
    path = tmp_path / "by-url.jsonl"
    caption_rows(["http://x/1.jpg", "http://x/2.jpg", "http://x/3.jpg"]).to_json(path, orient="records", lines=True)
    with pytest.raises(
        SigmaError, match=r"^--captions .*by-url.jsonl: none of its 3 keys .* \(e.g. 'http://x/1.jpg'\)"
    ):
        caption_table.prepare(ray_local, captions.resolve(path), shard_list, tmp_path / "enc")
    # a rerun (every per-shard file already written) refuses it the same way
    with pytest.raises(SigmaError, match=r"none of its 3 keys"):
        caption_table.prepare(ray_local, captions.resolve(path), shard_list, tmp_path / "enc")
    # a merge task's refusal reaches the caller as itself: its one line, not Ray's traceback
    caption_rows(["000000001", "000000001"]).to_json(path, orient="records", lines=True)
    with pytest.raises(SigmaError) as e:
        caption_table.prepare(ray_local, captions.resolve(path), shard_list, tmp_path / "enc")
    assert (
        str(e.value) == f"--captions {path}: key '000000001' has 2 caption rows (in by-url); give each key one caption"
    )
