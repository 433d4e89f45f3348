"""The pairs' fingerprint (pea.train.shards.data_fingerprint) keys the pack, the embed cache and a version's lineage: it must
change with every column pack writes, the native flag included, and tell NULL from ''; it must not change with row
order or file layout."""

import pyarrow as pa
import pyarrow.parquet as pq

from pea.train.shards import data_fingerprint

ROWS = {"key": ["000000000", "000000001", "000000002"], "image_sha256": ["a" * 64, "b" * 64, "c" * 64],
        "caption_en": ["one red circle", "two blue squares", ""], "caption": ["红色的圆形", "两个蓝色的正方形", "金砖"],
        "native": [False, False, True]}


def _fingerprint(tmp_path, name: str, **changes) -> str:
    table = pa.table({**ROWS, **changes})
    pq.write_table(table, tmp_path / f"{name}.parquet", row_group_size=2)
    return data_fingerprint(tmp_path / f"{name}.parquet")


def test_every_packed_column_changes_the_fingerprint_and_row_order_does_not(tmp_path):
    base = _fingerprint(tmp_path, "base")
    reordered = {k: list(reversed(v)) for k, v in ROWS.items()}
    assert _fingerprint(tmp_path, "reordered", **reordered) == base
    changed = {
        "native": _fingerprint(tmp_path, "native", native=[True, False, True]),  # only which rows are native
        "key": _fingerprint(tmp_path, "key", key=["000000000", "000000001", "000000009"]),
        "null_en": _fingerprint(tmp_path, "null", caption_en=["one red circle", "two blue squares", None]),
        "shifted": _fingerprint(tmp_path, "shifted", caption_en=["one red circl", "two blue squares", ""],
                                caption=["e红色的圆形", "两个蓝色的正方形", "金砖"]),  # a letter moved across columns
        "image": _fingerprint(tmp_path, "image", image_sha256=["a" * 64, "b" * 64, "d" * 64]),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed
