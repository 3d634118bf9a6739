"""Captions made elsewhere: a `key, caption` table (one file, or a folder of parquet/jsonl/csv) is encoded
like a recaption CAPDIR; a table that matches no curated key, or a run left with nothing to encode, fails
in one line."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from encoding import caption_table, encode
from shards import captions, encoded, reasons
from shards.errors import SigmaError
from tests.shards.synthetic import sample, write_curated

SHARDS = [[sample(1, 300, 260), sample(2, 280, 280)], [sample(10, 300, 300), sample(11, 260, 300)]]
KEYS = ["000000001", "000000002", "000000010", "000000011"]


def args(root, caps, out: str, models: dict) -> list[str]:
    return [
        "--images",
        str(root / "curated" / "shards"),
        "--captions",
        str(caps),
        "--out",
        str(root / out),
        "--tier",
        "256",
        "--profile",
        "demo",
        "--set",
        f"models.t5={models['t5']}",
        "--set",
        f"models.vae={models['vae']}",
    ]


def table(keys=KEYS) -> pd.DataFrame:
    return pd.DataFrame({"key": keys, "caption": [f"a photo number {k[-2:]}" for k in keys]})


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("byod")
    write_curated(root, SHARDS)
    for f in (root / "captions").iterdir():  # the recaption CAPDIR is not used here
        f.unlink()
    return root


def kept_captions(encdir) -> dict[str, dict]:
    idx = pq.read_table(encdir / encoded.INDEX).to_pandas()
    assert set(idx["key"]) == set(KEYS)  # every curated sample accounted for
    out: dict = {}  # {key: {set: caption}}, from each tar's caption-set files
    for shard in encoded.committed_shards(encdir):
        for name, file in encoded.set_files(shard).items():
            for row in encoded.read_set(file, ["key", "caption"]):
                out.setdefault(row["key"], {})[name] = row["caption"]
    return out


# ---------------------------------------------------------------------------------------------
# shards.captions on its own
# ---------------------------------------------------------------------------------------------


def test_a_key_caption_table_gets_the_other_columns(tmp_path):
    path = tmp_path / "vendor.csv"
    pd.DataFrame({"key": ["000000001", "000000002"], "caption": ["a fox", "  "], "extra": [1, 2]}).to_csv(
        path, index=False
    )
    df = captions.read_file(path)
    assert list(df.columns) == [
        "key",
        "caption",
        "captioner",
        "prompt",
        "original_caption",
        "num_tokens",
        "status",
        "reason",
    ]
    rows = df.to_dict("records")
    assert rows[0] == dict(
        key="000000001",
        caption="a fox",
        captioner="table:vendor.csv",
        prompt="",
        original_caption=None,
        num_tokens=0,
        status=reasons.KEPT,
        reason="",
    )
    assert (rows[1]["status"], rows[1]["reason"]) == (reasons.FAILED, reasons.EMPTY_CAPTION)
    assert rows[0]["key"] == "000000001"  # leading zeros kept (csv read as text)


def test_bad_tables_are_one_line_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "1", "caption": "x"}\n')
    with pytest.raises(SigmaError, match=r"a.jsonl: no 'key' column .*it has \['id', 'caption'\]"):
        captions.read_file(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"key": "1", "caption": "x"}\n')
    (tmp_path / "c.jsonl").write_text('{"key": "1", "caption": "y"}\n')
    (tmp_path / "a.jsonl").unlink()
    with pytest.raises(SigmaError, match=r"key '1' has 2 caption rows \(in b, c\)"):
        captions.read_table(captions.resolve(tmp_path))
    with pytest.raises(SigmaError, match="no such file or folder"):
        captions.resolve(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("key,caption\n")
    with pytest.raises(SigmaError, match=r"x.txt: not a caption table"):
        captions.resolve(tmp_path / "x.txt")


def test_a_folder_is_per_shard_only_when_its_files_are_named_after_the_shards(tmp_path):
    pd.DataFrame({"key": ["1"], "text": ["a fox"]}).to_parquet(tmp_path / "00000.parquet")
    with pytest.raises(SigmaError, match=r"00000.parquet: no 'caption' column .*it has \['key', 'text'\]"):
        captions.resolve(tmp_path, ["/c/shards/00000.tar"])  # checked at once, not per sample later
    table(["1"]).to_parquet(tmp_path / "00000.parquet")
    assert captions.resolve(tmp_path, ["/c/shards/00000.tar"]).kind == captions.PER_SHARD
    assert captions.resolve(tmp_path, ["/c/shards/00007.tar"]).kind == captions.TABLE  # a part file, not a shard's
    (tmp_path / "more.csv").write_text("key,caption\n")
    assert captions.resolve(tmp_path, ["/c/shards/00000.tar"]).kind == captions.TABLE


def test_nothing_encoded_for_missing_captions_is_an_error():
    idx = pd.DataFrame(
        {
            "key": ["a", "b"],
            "status": [reasons.FAILED, reasons.REJECTED],
            "reason": [reasons.MISSING_CAPTION, reasons.NOT_IN_TIER],
        }
    )
    with pytest.raises(SigmaError, match=r"--captions caps: nothing encoded: 1 of 2 samples have no caption row"):
        encode._check_something_encoded(idx, "caps")
    idx.loc[0, "status"] = reasons.KEPT
    encode._check_something_encoded(idx, "caps")  # something encoded: fine


# ---------------------------------------------------------------------------------------------
# encoding/encode with caption tables
# ---------------------------------------------------------------------------------------------


def test_a_single_caption_table_encodes(curated, shard_models, ray_local, capsys):
    path = curated / "vendor.parquet"
    table().to_parquet(path)
    encode.main(args(curated, path, "enc-file", shard_models))
    got = kept_captions(curated / "enc-file")
    assert set(got) == set(KEYS)
    assert got["000000010"]["recaption"] == "a photo number 10"
    alt = {k: v["original"] for k, v in got.items()}
    assert all(alt.values())  # no original_caption column: the shards' KEY.txt alt text is used
    # the table was split per shard by tasks; each read task was handed a file name, not rows
    (work,) = (curated / "enc-file" / caption_table.WORK).iterdir()
    assert sorted(p.name for p in work.iterdir()) == ["00000.parquet", "00001.parquet", "spans.parquet", "table.json"]
    assert pq.read_table(work / "00001.parquet")["key"].to_pylist() == KEYS[2:]


def test_a_folder_of_tables_encodes(curated, shard_models, ray_local, capsys):
    folder = curated / "vendor-folder"
    folder.mkdir()
    df = table()
    df.iloc[:3].to_json(folder / "part-0.jsonl", orient="records", lines=True)
    df.iloc[3:].to_csv(folder / "part-1.csv", index=False)
    encode.main(args(curated, folder, "enc-folder", shard_models))
    got = kept_captions(curated / "enc-folder")
    assert {k: v["recaption"] for k, v in got.items()} == dict(zip(df["key"], df["caption"]))


def test_per_shard_files_with_only_key_and_caption_encode(curated, shard_models, ray_local, capsys):
    folder = curated / "per-shard"
    folder.mkdir()
    table(KEYS[:2]).to_parquet(folder / "00000.parquet")
    table(KEYS[2:]).to_parquet(folder / "00001.parquet")
    encode.main(args(curated, folder, "enc-per-shard", shard_models))
    assert set(kept_captions(curated / "enc-per-shard")) == set(KEYS)


def test_a_table_matching_no_key_fails_in_one_line(curated, shard_models, capsys):
    path = curated / "by-url.csv"
    pd.DataFrame({"key": ["http://x/1.jpg", "http://x/2.jpg"], "caption": ["a", "b"]}).to_csv(path, index=False)
    with pytest.raises(SystemExit) as e:
        encode.main(args(curated, path, "enc-nomatch", shard_models))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --captions {path}: none of its 2 keys is a key of the curated shards"), err


def test_a_key_given_twice_fails_in_one_line(curated, shard_models, ray_local, capsys):
    folder = curated / "twice"
    folder.mkdir()
    table(KEYS[:3]).to_parquet(folder / "a.parquet")
    table(KEYS[2:]).to_json(folder / "b.jsonl", orient="records", lines=True)
    with pytest.raises(SystemExit) as e:
        encode.main(args(curated, folder, "enc-twice", shard_models))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --captions {folder}: key '000000010' has 2 caption rows (in a, b);"), err


def test_the_caption_report_reads_a_table(tmp_path):
    from captioning.report import build, write_caption_report

    path = tmp_path / "vendor.jsonl"
    pd.DataFrame({"key": ["k1", "k2", "k3"], "caption": ["a red fox", "a small house", ""]}).to_json(
        path, orient="records", lines=True
    )
    page = build(path)
    assert "a red fox" in page and "table:vendor.jsonl" in page and reasons.EMPTY_CAPTION in page
    assert write_caption_report(path) == tmp_path / "vendor.report.html"
    assert (tmp_path / "vendor.report.html").read_text() == page
