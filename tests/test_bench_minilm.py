"""The headline benchmark's workload (bench/minilm.py) and its real model (bench/models/minilm)."""

from __future__ import annotations

import http.client
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest

from bench import minilm
from bench.headline import counters, total


def test_corpus_is_distinct_and_the_same_on_every_run() -> None:
    texts = minilm.corpus()
    assert len(texts) == minilm.CORPUS_SIZE == len(set(texts))
    assert texts == minilm.corpus()
    assert all(t[0].isupper() and t.endswith(".") and "\n" not in t for t in texts)


def test_zipf_draws_favour_the_first_texts_as_the_cdf_says() -> None:
    ranks = minilm.zipf_ranks(200_000, seed=3)
    assert ranks.min() >= 0 and ranks.max() < minilm.CORPUS_SIZE
    assert np.mean(ranks < 1000) == pytest.approx(minilm.top_share(1000), abs=0.01)
    assert 0.8 < minilm.top_share(1000) < 0.9


@pytest.mark.parametrize(("variant", "batcher", "cache"), [("plain", False, False), ("batcher", True, False),
                                                          ("cache", True, True)])
def test_repository_variants(tmp_path: Path, variant: minilm.Variant, batcher: bool, cache: bool) -> None:
    repo = minilm.model_repository(tmp_path, variant)
    config = (repo / minilm.MODEL / "config.pbtxt").read_text()
    assert ("dynamic_batching {" in config) is batcher
    assert "max_queue_delay_microseconds: 2000" in config or not batcher
    assert ("response_cache {" in config) is cache
    assert (repo / minilm.MODEL / "1" / "model.py").is_file()
    assert bool(minilm.triton_args(variant)) is cache


def test_wrk_script_pastes_json_escaped_texts(tmp_path: Path) -> None:
    script = minilm.wrk_script(tmp_path, ['say "hi"', "plain"], unique=True)
    lines = (tmp_path / "texts.txt").read_text().splitlines()
    assert lines == ['say \\"hi\\"', "plain"]
    text = script.read_text()
    assert "unique, seed = " in text and "true, 1" in text and str(tmp_path / "texts.txt") in text


def test_counters_read_prometheus_samples() -> None:
    page = ('# HELP x\nsidecar_cache_requests_total{model="minilm",result="hit"} 7.0\n'
            'sidecar_cache_requests_total{model="other",result="hit"} 1.0\nsidecar_batch_size_count 3\n')
    samples = counters(page)
    assert total(samples, "sidecar_cache_requests_total", model="minilm", result="hit") == 7
    assert total(samples, "sidecar_cache_requests_total", result="hit") == 8
    assert total(samples, "sidecar_batch_size_count") == 3


def _infer_rows(url: str, texts: list[str]) -> np.ndarray:
    body = orjson.dumps({"inputs": [{"name": "text", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]})
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", minilm.INFER_PATH, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = orjson.loads(response.read())
    finally:
        connection.close()
    assert response.status == 200, answer
    output = answer["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def test_real_model_answers_each_row_as_it_would_alone(tmp_path: Path) -> None:
    """Rows batched by Triton's dynamic batcher or sent as one request of several rows get the embedding each
    text gets alone: unit length, 384 values, distinct texts apart."""
    texts = minilm.corpus()[:8]
    with minilm.triton_server(tmp_path, "batcher").start(180) as triton:
        alone = np.vstack([minilm.embed(triton.url, t) for t in texts])
        with ThreadPoolExecutor(len(texts)) as pool:
            concurrent = np.vstack(list(pool.map(lambda t: minilm.embed(triton.url, t), texts)))
        rows = _infer_rows(triton.url, texts)
    assert alone.shape == (len(texts), minilm.DIMENSIONS)
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(concurrent, alone, atol=1e-4)
    np.testing.assert_allclose(rows, alone, atol=1e-4)
    similarity = alone @ alone.T
    assert (similarity[~np.eye(len(texts), dtype=bool)] < 0.99).all()
