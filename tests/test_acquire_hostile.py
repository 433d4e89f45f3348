"""Hostile inputs served from 127.0.0.1: acquire (img2dataset, really downloading) then filter count every one.

One manifest holds good images and every hostile case; none may crash or hang the stage, and each lands
under its own reason in the data-quality report.
"""

import json
import time

import pyarrow.parquet as pq
import pytest
from hostile_site import (  # tests/hostile_site.py: the site
    ALLOWED,
    EXPECTED,
    GOOD,
    MAX_BYTES,
    TIMEOUT_S,
    hostile_spec,
)

from pea.corpus.acquire import acquire
from pea.corpus.fetch import fetch_image
from pea.corpus.filter import filter_pairs
from pea.spec import LanguageSpec, ManifestSpec


@pytest.fixture(scope="module")
def acquired(zh_spec: LanguageSpec, hostile_server: str, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostile")
    spec = hostile_spec(zh_spec, hostile_server, root)
    start = time.perf_counter()
    result = acquire(spec, root / "lake")
    return spec, root / "lake", result, time.perf_counter() - start


def test_every_hostile_url_ends_within_the_timeout_and_is_counted(acquired) -> None:
    spec, lake, result, seconds = acquired
    assert seconds < 60  # img2dataset's own fetch would hang forever on /trickle.png
    assert result.manifest_rows == len(EXPECTED) + 1 and result.dropped_before_download["bad_url"] == 2
    assert result.dropped_before_download["manifest_unreadable"] == 1
    raw = pq.read_table(lake / "zh" / "raw" / "00000.parquet", columns=["url", "error_message"]).to_pylist()
    for name in ("/stall.png", "/trickle.png", "/slow-headers.png"):
        row = next(r for r in raw if r["url"].endswith(name))
        assert row["error_message"].startswith("timeout:"), (name, row["error_message"])
    # In img2dataset's worker processes too: the spec's allow-list reached them (the good rows were fetched from
    # 127.0.0.1) and nothing else non-public was contacted, directly or through a redirect.
    assert spec.corpus.allow_networks == list(ALLOWED) and result.successes == len(GOOD)
    for name in ("/to-private.png", "127.0.0.2:9/x.png"):
        row = next(r for r in raw if r["url"].endswith(name))
        assert row["error_message"].startswith("blocked_address: 127.0.0.2 is 127.0.0.2 (loopback)"), row


@pytest.mark.parametrize("path", ["/slow-headers.png", "/trickle.png", "/loop.png"])
def test_one_deadline_bounds_the_whole_download_headers_and_redirects_included(hostile_server: str,
                                                                                    path: str) -> None:
    # Each byte of /slow-headers.png's status line and headers comes well within the timeout, so a timeout per
    # read (http.client's, img2dataset's) would wait for all 10 kB: about 30 minutes.
    import img2dataset.downloader  # noqa: F401 - fetch_image imports it; its import time is no download time

    start = time.monotonic()
    key, stream, error = fetch_image((7, hostile_server + path), TIMEOUT_S, max_bytes=MAX_BYTES, allow_networks=ALLOWED)
    seconds = time.monotonic() - start
    assert key == 7 and stream is None and seconds < TIMEOUT_S + 1
    assert error.startswith("redirect:" if path == "/loop.png" else "timeout:"), error


def test_fetch_still_downloads_a_good_image_through_the_deadline_reader(hostile_server: str) -> None:
    key, stream, error = fetch_image((1, hostile_server + "/ok/3.png"), TIMEOUT_S, max_bytes=MAX_BYTES, allow_networks=ALLOWED)
    assert error is None and stream.read() == GOOD["/ok/3.png"]


def test_filter_counts_each_hostile_input_under_its_reason(acquired) -> None:
    spec, lake, _, _ = acquired
    result = filter_pairs(spec, lake)
    expected: dict[str, int] = {}
    for path, reason in EXPECTED.items():
        if reason is not None:
            expected[reason] = expected.get(reason, 0) + 1
    expected["manifest_unreadable"] = 1
    expected["caption_too_long"] = 1  # /ok/1.png with 10k characters
    assert {k: v for k, v in result.dropped.items() if v} == expected
    assert result.rows_in == len(EXPECTED) + 1
    assert result.rows_out == len(GOOD) - 1
    pairs = pq.read_table(result.pairs_path).to_pylist()
    first = next(p for p in pairs if p["caption_en"].startswith("one red circle") and "number" not in p["caption_en"])
    assert first["caption_en"] == "one red circle" and first["caption"] == "左边有一个红色的圆形"  # controls gone
    report = json.loads(result.report_path.read_text())
    assert report["dropped"] == result.dropped
    messages = {e["reason"] for e in report["download_errors"]}
    assert {"download_timeout", "download_redirect", "download_too_large"} <= messages


def test_manifest_missing_a_column_is_refused_naming_it_and_the_columns_it_has(zh_spec, tmp_path) -> None:
    manifest = tmp_path / "zh.csv"
    manifest.write_text("url,caption_en\nhttp://127.0.0.1:9/x.png,x\n")
    corpus = zh_spec.corpus.model_copy(update={"manifests": [ManifestSpec(path=str(manifest))], "synthetic": None})
    with pytest.raises(ValueError, match=r"zh\.csv lacks column\(s\) caption_zh \(has url, caption_en\)"):
        acquire(zh_spec.model_copy(update={"corpus": corpus}), tmp_path / "lake")
