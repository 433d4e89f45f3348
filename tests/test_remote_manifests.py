"""Manifests at http(s) and s3:// URLs, read by the real acquire stage through DuckDB and fsspec, streamed in ranges,
and every connection made for them (acquire's check and reads, the source fingerprint) held to the image fetch's
address guard on every redirect hop. Every server listens on 127.0.0.1 or 127.0.0.2; nothing else is contacted."""

import io
import os
import ssl

import duckdb
import pyarrow.parquet as pq
import pytest
import trustme
from hostile_site import GOOD  # tests/hostile_site.py: real PNGs
from manifest_site import (  # tests/manifest_site.py: the manifest host
    PASSWORD,
    USER,
    Site,
    serving,
)

from pea import ops
from pea.corpus import remote
from pea.corpus.acquire import acquire
from pea.corpus.manifest import prepare_url_list
from pea.io.addresses import networks
from pea.spec import ManifestSpec

ALLOWED = ["127.0.0.1/32"]  # 127.0.0.2 stays refused: the canary


def _parquet(rows: list[tuple[str, str, str]]) -> bytes:
    table = duckdb.sql("SELECT * FROM (VALUES " + ", ".join(f"('{u}', '{e}', '{z}')" for u, e, z in rows)
                       + ") t(url, caption_en, caption_zh)").to_arrow_table()
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _csv(rows: list[tuple[str, str, str]]) -> bytes:
    return ("url,caption_en,caption_zh\n" + "".join(f"{u},{e},{z}\n" for u, e, z in rows)).encode()


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """origin (http and https on 127.0.0.1, the images and the manifests) and canary (127.0.0.2, refused)."""
    ca = trustme.CA()
    bundle = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    origin, canary = Site(), Site()
    with serving(origin) as http, serving(origin, tls=tls) as https, serving(canary, "127.0.0.2") as canary_url:
        origin.redirect_to = canary_url
        images = sorted(GOOD)[:6]
        for path in images:
            origin.files[path] = canary.files[path] = GOOD[path]
        rows = [(http + path, f"picture {i}", f"图片{i}") for i, path in enumerate(images)]
        origin.files["/m.parquet"] = canary.files["/m.parquet"] = _parquet(rows[:3])
        origin.files["/m.csv"] = _csv(rows[3:])
        origin.files["/private/m.parquet"] = _parquet(rows[:2])
        previous = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = str(bundle)  # the https origin's CA, as a private CA is trusted in production
        try:
            yield {"http": http, "https": https, "canary": canary_url, "origin": origin, "canary_site": canary,
                   "rows": rows}
        finally:
            if previous is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = previous


def _spec(base, manifests: list[str], **corpus):
    fields = {"synthetic": None, "manifests": [ManifestSpec(path=p) for p in manifests], "allow_networks": ALLOWED,
              "timeout_s": 5, "rows_per_shard": 100, "processes": 1, "threads": 4, **corpus}
    return base.model_copy(update={"corpus": base.corpus.model_copy(update=fields)})


def test_parquet_over_http_and_csv_over_https_are_acquired(zh_spec, sites, tmp_path):
    spec = _spec(zh_spec, [sites["http"] + "/m.parquet", sites["https"] + "/m.csv"])
    sites["origin"].hits.clear()
    result = acquire(spec, tmp_path / "lake")
    assert result.manifest_rows == 6 and result.rows == 6 and result.successes == 6, result
    raw = pq.read_table(tmp_path / "lake" / "zh" / "raw" / "00000.parquet", columns=["url", "caption_zh"])
    assert sorted(raw.column("caption_zh").to_pylist()) == sorted(z for _, _, z in sites["rows"])
    # Read in ranges (fsspec's HTTPFile), the way a manifest larger than memory is streamed.
    assert any(m == "GET" and p == "/m.csv" and r for m, p, r, _ in sites["origin"].hits), sites["origin"].hits
    assert sites["canary_site"].hits == []


def test_a_large_manifest_is_read_in_bounded_ranges(zh_spec, sites, tmp_path):
    # 4 fetchable rows and 400,000 that are dropped before download (ftp://): ~9 MB, read in ranges of at most
    # DuckDB's read (~2 MiB) plus remote.BLOCK_BYTES.
    rows = [(sites["http"] + "/ok/0.png", "a", "甲")] * 4 + [(f"ftp://h/{i}.png", "b", "乙") for i in range(400_000)]
    sites["origin"].files["/big.csv"] = data = _csv(rows)
    sites["origin"].largest_body = 0
    urls = prepare_url_list(_spec(zh_spec, [sites["http"] + "/big.csv"]), [ManifestSpec(path=sites["http"] + "/big.csv")],
                            tmp_path / "manifest-urls")
    assert urls.rows == 4 and urls.rows_in == len(rows) and urls.dropped["bad_url"] == 400_000
    ranges = [r for m, p, r, _ in sites["origin"].hits if m == "GET" and p == "/big.csv"]
    assert len(ranges) >= 3 and all(ranges), ranges  # never one GET of the whole file
    assert 0 < sites["origin"].largest_body <= (2 << 20) + remote.BLOCK_BYTES < len(data) / 2, ranges


def _refused(url: str) -> str:
    return (f"manifest {url}: refused to connect to 127.0.0.2 (loopback), where the URL or a redirect from it led; "
            "pea reads manifests only from public addresses unless the spec's corpus.allow_networks lists the network")


@pytest.mark.parametrize("path", ["/to/m.parquet", "/get-to/m.parquet"])
def test_a_redirect_to_a_refused_address_fails_as_a_direct_one_and_never_reaches_it(zh_spec, sites, tmp_path, path):
    # /to/ redirects every request; /get-to/ answers HEAD itself and redirects only the GETs DuckDB's reads send.
    canary = sites["canary_site"]
    canary.hits.clear()
    for url in (sites["http"] + path, sites["canary"] + "/m.parquet"):
        with pytest.raises(PermissionError) as raised:
            acquire(_spec(zh_spec, [url]), tmp_path / "lake")
        assert str(raised.value) == _refused(url)
    assert canary.hits == []  # not a HEAD, not a GET: the socket was never opened
    assert any(p == path for _, p, _, _ in sites["origin"].hits)  # the origin was asked, and answered 302


def test_the_source_fingerprint_holds_the_guard_too(zh_spec, sites):
    canary = sites["canary_site"]
    canary.hits.clear()
    spec = _spec(zh_spec, [sites["http"] + "/to/m.parquet"])
    assert ops._manifest_digest(sites["http"] + "/to/m.parquet", networks(ALLOWED)) == "unreadable (PermissionError)"
    reachable = ops.manifests_fingerprint(_spec(zh_spec, [sites["http"] + "/m.parquet"]))
    assert ops.manifests_fingerprint(spec) != reachable and canary.hits == []
    opened = _spec(zh_spec, [sites["http"] + "/to/m.parquet"], allow_networks=["127.0.0.0/8"])
    assert ops._manifest_digest(sites["http"] + "/to/m.parquet", networks(["127.0.0.0/8"])).endswith(':"v1"')
    assert ops.manifests_fingerprint(opened) and [(m, p) for m, p, *_ in canary.hits] == [("HEAD", "/m.parquet")] * 2


def test_user_info_is_sent_as_basic_auth_to_its_host_only_and_never_shown(zh_spec, sites, tmp_path, capsys):
    host = sites["http"].split("://")[1]
    good = f"http://{USER}:{PASSWORD.replace('/', '%2F').replace('#', '%23')}@{host}/private/m.parquet"
    urls = prepare_url_list(_spec(zh_spec, [good]), [ManifestSpec(path=good)], tmp_path / "a")
    assert urls.rows == 2
    assert any(auth and auth.startswith("Basic ") for _, p, _, auth in sites["origin"].hits if p == "/private/m.parquet")
    report = (tmp_path / "a.json").read_text()
    assert "%2F" not in report and f"{USER}:***@" in report
    wrong = f"http://{USER}:not-the-{PASSWORD.replace('/', '%2F').replace('#', '%23')}@{host}/private/m.parquet"
    with pytest.raises(PermissionError, match=r"answered 401") as raised:
        prepare_url_list(_spec(zh_spec, [wrong]), [ManifestSpec(path=wrong)], tmp_path / "b")
    assert "not-the" not in str(raised.value) and f"{USER}:***@" in str(raised.value)
    # A redirect to another host does not carry the credentials (aiohttp drops Authorization across origins).
    sites["canary_site"].hits.clear()
    moved = f"http://{USER}:x%2Fy@{host}/to/m.parquet"
    prepare_url_list(_spec(zh_spec, [moved], allow_networks=["127.0.0.0/8"]), [ManifestSpec(path=moved)],
                     tmp_path / "c")
    assert sites["canary_site"].hits and all(auth is None for *_, auth in sites["canary_site"].hits)
    assert "x/y" not in capsys.readouterr().out


def test_an_s3_manifest_is_read_through_s3fs(zh_spec, sites, tmp_path, monkeypatch):
    """moto's S3 server on 127.0.0.1; s3fs finds it through AWS_ENDPOINT_URL, as it would a MinIO."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
        s3.create_bucket(Bucket="manifests")
        s3.put_object(Bucket="manifests", Key="zh/m.parquet", Body=sites["origin"].files["/m.parquet"])
        url = "s3://manifests/zh/m.parquet"
        urls = prepare_url_list(_spec(zh_spec, [url]), [ManifestSpec(path=url)], tmp_path / "manifest-urls")
        assert urls.rows == 3 and urls.rows_in == 3
        assert ops._manifest_digest(url).startswith(f"{len(sites['origin'].files['/m.parquet'])}:")
        with pytest.raises(FileNotFoundError, match="s3://manifests/zh/absent.parquet does not exist"):
            absent = "s3://manifests/zh/absent.parquet"
            prepare_url_list(_spec(zh_spec, [absent]), [ManifestSpec(path=absent)], tmp_path / "other")
    finally:
        server.stop()


def test_a_gs_manifest_is_read_through_gcsfs(zh_spec, sites, tmp_path, monkeypatch):
    """tests/manifest_site.py's FakeGCS on 127.0.0.1; gcsfs finds it through STORAGE_EMULATOR_HOST, anonymously."""
    import sys
    import threading
    from http.server import ThreadingHTTPServer

    import fsspec
    from manifest_site import FakeGCS

    # gcsfs 2026.10's experimental class first asks the bucket's type over gRPC, which a fake cannot answer (a
    # minute of retries): chosen when gcsfs is imported, so this must come first.
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    assert "gcsfs" not in sys.modules or sys.modules["gcsfs"].GCSFileSystem.__name__ == "GCSFileSystem"
    FakeGCS.objects = {("manifests", "zh/m.parquet"): sites["origin"].files["/m.parquet"]}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeGCS)
    httpd.handle_error = lambda request, address: None  # gcsfs hangs up on reads it no longer needs
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{httpd.server_address[1]}")
        monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})  # no credential lookup (metadata server)
        url = "gs://manifests/zh/m.parquet"
        urls = prepare_url_list(_spec(zh_spec, [url]), [ManifestSpec(path=url)], tmp_path / "manifest-urls")
        assert urls.rows == 3 and urls.rows_in == 3
        assert ops._manifest_digest(url) == f"{len(FakeGCS.objects['manifests', 'zh/m.parquet'])}:2026-12-01 10:00:00+00:00"
    finally:
        httpd.shutdown()
        httpd.server_close()
