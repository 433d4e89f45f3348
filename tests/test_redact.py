"""pea.io.redact masks credentials in URLs, signed query parameters and secret environment assignments, as DeepSpeed's
runners, MLflow URIs and signed manifest URLs write them, and leaves everything else as it was."""

import pytest

from pea.io.redact import redact, redact_all, redact_url


@pytest.mark.parametrize("text, masked", [
    ("https://alice:s3cret@mlflow.example.org/", "https://alice:***@mlflow.example.org/"),
    ("postgresql://pea:hunter2@db:5432/mlflow", "postgresql://pea:***@db:5432/mlflow"),
    ("https://ghp_abc123@github.com/org/pea.git", "https://***@github.com/org/pea.git"),
    ("https://b.s3.amazonaws.com/zh.parquet?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&v=2",
     "https://b.s3.amazonaws.com/zh.parquet?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***&v=2"),
    ("https://acct.blob.core.windows.net/c/zh.parquet?sv=2024&sig=Zm9v%3D&se=2030",
     "https://acct.blob.core.windows.net/c/zh.parquet?sv=2024&sig=***&se=2030"),
    ("gs://b/zh.parquet?X-Goog-Signature=ff00&token=t&access_token=a&key=k",
     "gs://b/zh.parquet?X-Goog-Signature=***&token=***&access_token=***&key=***"),
])
def test_urls(text, masked):
    assert redact_url(text) == masked and redact(f"read {text} now") == f"read {masked} now"


@pytest.mark.parametrize("text, masked", [
    ("pdsh -S -f 1024 -w n0,n1 export MLFLOW_TRACKING_TOKEN=tok123; export PYTHONPATH=/x; cd /run;",
     "pdsh -S -f 1024 -w n0,n1 export MLFLOW_TRACKING_TOKEN=***; export PYTHONPATH=/x; cd /run;"),
    ("mpirun -x MLFLOW_TRACKING_PASSWORD=pw -x NCCL_DEBUG=INFO python", "mpirun -x MLFLOW_TRACKING_PASSWORD=*** "
     "-x NCCL_DEBUG=INFO python"),
    ("srun --export=ALL,AWS_SECRET_ACCESS_KEY=abc/def,PEA_LAKE=/lake python",
     "srun --export=ALL,AWS_SECRET_ACCESS_KEY=***,PEA_LAKE=/lake python"),
    ("mpiexec -genv HF_TOKEN hf_xyz -genv MASTER_ADDR n0", "mpiexec -genv HF_TOKEN *** -genv MASTER_ADDR n0"),
    ("-genv AWS_SESSION_TOKEN=q1 -genv PEA_HOME=/h", "-genv AWS_SESSION_TOKEN=*** -genv PEA_HOME=/h"),
    ("MY_API_KEY='a b c' rest", "MY_API_KEY=*** rest"),
])
def test_environment_assignments(text, masked):
    assert redact(text) == masked


def test_plain_text_and_uris_without_secrets_are_unchanged():
    for text in ("sqlite:////work/tracking/mlflow.db", "http://127.0.0.1:5000/#/experiments/1/runs/abc",
                 "loss 0.123 at step 40", "s3://bucket/zh.parquet?versionId=3", "PEA_LAKE=/lake PEA_DEVICE=cpu"):
        assert redact(text) == text
    assert redact(None) is None and redact(3) == 3


def test_structures_keep_their_shape():
    data = {"corpus": {"manifests": [{"path": "https://u:p@h/x.parquet"}]}, "n": 2, "t": ("TOKEN=a",)}
    assert redact_all(data) == {"corpus": {"manifests": [{"path": "https://u:***@h/x.parquet"}]}, "n": 2,
                                "t": ("TOKEN=***",)}


def test_secrets_of_the_environment_are_masked_in_any_form(monkeypatch):
    # A password holding '/' and '#': no URL parser keeps it whole, so only knowing the value finds it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:pa/ss#w0rd@mlflow.example.org")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a 'TOKEN' name with a short, ordinary value: kept
    text = "POST https://alice:pa/ss#w0rd@mlflow.example.org/api failed; sent pa%2Fss%23w0rd and Bearer hf_abcdefgh"
    masked = redact(text)
    assert "pa/ss" not in masked and "pa%2Fss" not in masked and "hf_abcdefgh" not in masked, masked
    assert "alice:***@mlflow.example.org" in masked and redact("false and true") == "false and true"


def test_an_exception_chain_and_log_records_are_masked(monkeypatch, capsys):
    import io
    import logging

    from pea.io.redact import MaskedStream, MaskingFilter, mask_exception

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-1234567")
    try:
        try:
            raise ConnectionError("GET https://u:p4ssw0rd@h/x?sig=abc failed")
        except ConnectionError as inner:
            raise RuntimeError("registry down, token tok-1234567") from inner
    except RuntimeError as err:
        mask_exception(err)
        assert "tok-1234567" not in str(err) and "p4ssw0rd" not in str(err.__cause__)
        assert "sig=***" in str(err.__cause__)
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.addFilter(MaskingFilter())
        logger = logging.getLogger("pea-test-masking")
        logger.addHandler(handler)
        logger.error("failed with %s", "https://u:p4ssw0rd@h/", exc_info=(type(err), err, err.__traceback__))
        logger.removeHandler(handler)
    assert "u:***@h" in stream.getvalue() and "p4ssw0rd" not in stream.getvalue() and "Traceback" in stream.getvalue()
    out = io.StringIO()
    masked = MaskedStream(out)
    masked.write("https://u:p4ss")  # a secret split across writes is masked once its line is whole
    masked.write("w0rd@h/ tok-1234567\nnext")
    masked.flush()
    assert out.getvalue() == "https://u:***@h/ ***\nnext"
