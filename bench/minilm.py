"""The real-model workload shared by the headline benchmark and the demo: MiniLM sentence embeddings.

- ``bench/models/minilm``: all-MiniLM-L6-v2 in Triton's python backend (torch on the CPU, one thread);
- ``model_repository(dest, variant)``: a repository holding it as ``plain`` (no batching, no cache),
  ``batcher`` (Triton's dynamic batcher) or ``cache`` (dynamic batcher + Triton's local response cache,
  which also needs ``triton_args(variant)`` on Triton's command line); ``triton_server()`` does both;
- ``corpus()``: 10,000 distinct, deterministic English sentences; ``zipf_ranks()`` draws from them the
  way the benchmark's load does (Zipf, s = 1.1: a few texts very often, most rarely);
- ``infer_body()`` / ``embed()``: one text per KServe v2 call;
- ``wrk_script()``: a wrk Lua script that sends one text per request, drawn Zipf(s) over the corpus
  (the CDF is computed once per wrk thread), optionally made unique per request so no cache can help.

Imports only the standard library, numpy, orjson and ``tests.servers`` (the bench's own venv).
"""

from __future__ import annotations

import http.client
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import numpy as np
import orjson

from tests.servers import TritonServer

ROOT = Path(__file__).resolve().parents[1]
MODEL = "minilm"
MODEL_DIR = ROOT / "bench" / "models" / MODEL
INFER_PATH = f"/v2/models/{MODEL}/infer"
DIMENSIONS = 384
CORPUS_SIZE = 10_000
ZIPF_S = 1.1
QUEUE_DELAY_US = 2000
CACHE_BYTES = 256 * 1024 * 1024

Variant = Literal["plain", "batcher", "cache"]
VARIANTS: tuple[Variant, ...] = ("plain", "batcher", "cache")

_DYNAMIC_BATCHING = "\ndynamic_batching {{\n  max_queue_delay_microseconds: {delay}\n}}\n"
_RESPONSE_CACHE = "\nresponse_cache {\n  enable: true\n}\n"


# -- the model repository ---------------------------------------------------------------------------


def model_config(variant: Variant, queue_delay_us: int = QUEUE_DELAY_US) -> str:
    """config.pbtxt of the model in one variant: the plain file, plus Triton's batcher and/or cache."""
    text = (MODEL_DIR / "config.pbtxt").read_text()
    if variant in ("batcher", "cache"):
        text += _DYNAMIC_BATCHING.format(delay=queue_delay_us)
    if variant == "cache":
        text += _RESPONSE_CACHE
    return text


def model_repository(dest: Path, variant: Variant, queue_delay_us: int = QUEUE_DELAY_US) -> Path:
    """A fresh model repository at ``dest`` holding the model in ``variant``; returns ``dest``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    model_dir = dest / MODEL
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(MODEL_DIR, model_dir, ignore=shutil.ignore_patterns("__pycache__"))
    (model_dir / "config.pbtxt").write_text(model_config(variant, queue_delay_us))
    return dest


def triton_args(variant: Variant, cache_bytes: int = CACHE_BYTES) -> list[str]:
    """Triton command-line arguments the variant needs: the local response cache's size."""
    return ["--cache-config", f"local,size={cache_bytes}"] if variant == "cache" else []


def triton_server(workdir: Path, variant: Variant = "plain") -> TritonServer:
    """A Triton (not started yet) serving the model in ``variant`` from a fresh repository under ``workdir``."""
    repo = model_repository(workdir / "models", variant)
    return TritonServer(repo, workdir, extra_args=triton_args(variant))


# -- the texts --------------------------------------------------------------------------------------

_SUBJECTS = (
    "the old fisherman", "a young teacher", "my neighbour", "the night nurse", "a tired student", "the mayor",
    "our new manager", "the bus driver", "a street musician", "the head chef", "a retired pilot", "the librarian",
    "my younger sister", "the village doctor", "a local farmer", "the museum guide", "a software engineer",
    "the baker", "an art student", "the train conductor", "a quiet poet", "the football coach", "the shop owner",
    "a travelling salesman", "the gardener", "a marine biologist", "the night watchman", "my grandfather",
    "the radio host", "a delivery rider",
)
_VERBS = (
    "repaired", "painted", "found", "sold", "borrowed", "described", "photographed", "cleaned", "carried",
    "forgot", "ordered", "measured", "hid", "returned", "designed", "opened", "wrapped", "lost", "examined",
    "delivered", "admired", "replaced", "counted", "ignored", "built",
)
_OBJECTS = (
    "a wooden boat", "the broken clock", "an umbrella", "a bag of oranges", "the red bicycle", "a heavy suitcase",
    "the family piano", "a stack of letters", "an old map", "the kitchen window", "a silver teapot",
    "the garden fence", "a box of tools", "the winter coats", "a strange key", "the concert tickets",
    "a paper lantern", "the office printer", "a jar of honey", "the leather boots", "a pile of books",
    "the wedding photos", "a basket of apples", "the school bell", "a glass vase",
)
_PLACES = (
    "near the harbour", "in the city library", "behind the train station", "at the Sunday market",
    "on the top floor", "outside the bakery", "in the mountain cabin", "by the river", "at the airport",
    "in the hospital car park", "under the bridge", "at the edge of the forest", "in a crowded cafe",
    "on the beach", "inside the old theatre", "at the bus stop", "in the school gym", "next to the church",
    "in the back garden", "at the town hall",
)
_TIMES = (
    "this morning", "last night", "before lunch", "during the storm", "after work", "on Tuesday",
    "at dawn", "yesterday afternoon", "over the weekend", "just before midnight", "in early spring",
    "during the holidays",
)


def corpus(size: int = CORPUS_SIZE, seed: int = 1) -> list[str]:
    """``size`` distinct English sentences, the same on every run (a seeded draw of word combinations)."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < size:
        words = (rng.choice(part) for part in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES, _TIMES))
        sentence = " ".join(words)
        seen.setdefault(sentence[0].upper() + sentence[1:] + ".", None)
    return list(seen)


def zipf_cdf(size: int = CORPUS_SIZE, s: float = ZIPF_S) -> np.ndarray:
    """Cumulative probabilities of ranks 1..size under Zipf(s); rank 1 (corpus[0]) the most frequent."""
    weights = np.arange(1, size + 1, dtype=np.float64) ** -s
    cdf: np.ndarray = np.cumsum(weights) / weights.sum()
    return cdf


def zipf_ranks(count: int, size: int = CORPUS_SIZE, s: float = ZIPF_S, seed: int = 0) -> np.ndarray:
    """``count`` corpus indexes (0-based) drawn Zipf(s), as the benchmark's load draws them."""
    cdf = zipf_cdf(size, s)
    picks = np.searchsorted(cdf, np.random.default_rng(seed).random(count), side="right")
    return np.minimum(picks, size - 1)


def top_share(top: int, size: int = CORPUS_SIZE, s: float = ZIPF_S) -> float:
    """Share of Zipf(s) traffic that goes to the ``top`` most frequent texts."""
    return float(zipf_cdf(size, s)[min(top, size) - 1])


# -- calls ------------------------------------------------------------------------------------------


def infer_body(text: str) -> bytes:
    """One text as a KServe v2 JSON call (batch of one row)."""
    return orjson.dumps({"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]})


def embed(url: str, text: str, timeout: float = 30.0) -> np.ndarray:
    """The embedding of one text from the server (or sidecar) at ``url``; raises on any non-200 answer."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        connection.request("POST", INFER_PATH, infer_body(text), {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"{url}{INFER_PATH} answered {response.status}: {answer[:200]!r}")
    output = next(o for o in orjson.loads(answer)["outputs"] if o["name"] == "embedding")
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


# -- wrk --------------------------------------------------------------------------------------------

_LUA = """\
-- One MiniLM call per request: a text drawn Zipf(s) over the corpus file (one JSON-escaped text a line).
local texts_file, s, unique, seed = "{texts}", {s!r}, {unique}, {seed}
local texts, cdf, counter, me = {{}}, {{}}, 0, 1
local head = '{{"inputs":[{{"name":"text","shape":[1,1],"datatype":"BYTES","data":["'
local tail = '"]}}]}}'
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("thread_id", next_id)
end

function init(args)
  me = thread_id or 1  -- the global setup() gave this thread
  for line in io.lines(texts_file) do texts[#texts + 1] = line end
  local total = 0
  for k = 1, #texts do total = total + k ^ (-s); cdf[k] = total end
  for k = 1, #texts do cdf[k] = cdf[k] / total end
  math.randomseed(seed + 7919 * me)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

local function draw()
  local u, lo, hi = math.random(), 1, #cdf
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return texts[lo]
end

function request()
  local text = draw()
  if unique then
    counter = counter + 1
    text = text .. " (call " .. me .. "-" .. counter .. ")"
  end
  return wrk.format(nil, nil, nil, head .. text .. tail)
end
"""


def wrk_script(dest: Path, texts: Sequence[str], s: float = ZIPF_S, unique: bool = False, seed: int = 1) -> Path:
    """Writes the texts file and the Lua script under ``dest``; returns the script's path."""
    dest.mkdir(parents=True, exist_ok=True)
    texts_file = dest / "texts.txt"
    # Each line is the JSON string's content, so the script pastes it between quotes as it is.
    texts_file.write_text("".join(orjson.dumps(t).decode()[1:-1] + "\n" for t in texts))
    name = "zipf-unique.lua" if unique else "zipf.lua"
    script = dest / name
    script.write_text(_LUA.format(texts=texts_file, s=s, unique="true" if unique else "false", seed=seed))
    return script
