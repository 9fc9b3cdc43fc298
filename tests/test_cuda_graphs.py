"""Forward passes replayed as CUDA graphs (cuda_graphs.py). They need a CUDA GPU, so every
test here skips on a machine without one (scripts/gpu_check.sh runs them on a GPU host)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gannet.model_cache import ModelKey, yolo_loader
from gannet.settings import REPO_ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WEIGHTS = REPO_ROOT / "models" / "demo" / "detect.pt"


def _network(cuda_graphs: bool) -> torch.nn.Module:
    """The demo detector's network as the ModelCache's loader leaves it on cuda:0."""
    load = yolo_loader(lambda uri, version: Path(uri), trace=True, cuda_graphs=cuda_graphs)
    key = ModelKey(str(WEIGHTS), "v", "cuda:0", 640, "detect")
    model, _ = load(key)
    network: torch.nn.Module = model.predictor.model.backend.model
    return network


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


def test_replayed_graphs_answer_as_the_plain_pass_and_keep_earlier_answers() -> None:
    """Each batch shape gets its own graph, its answers match the plain traced pass, and
    an answer handed out stays as it was after the next batch of that shape replays
    (a runner reads its answer after the batcher has moved on)."""
    graphed, plain = _network(cuda_graphs=True), _network(cuda_graphs=False)
    torch.manual_seed(0)
    with torch.inference_mode():
        for rows, height in ((1, 640), (3, 480), (3, 480), (8, 640)):
            x = torch.rand(rows, 3, height, 640, device="cuda:0", dtype=torch.float16)
            first = _first(graphed(x)).clone()
            torch.testing.assert_close(first, _first(plain(x)), atol=1e-2, rtol=1e-3)
            answer = _first(graphed(x))
            graphed(torch.rand_like(x))  # the next batch of the same shape
            torch.testing.assert_close(answer, first, atol=0, rtol=0)
    graphs = graphed._graphs  # type: ignore[attr-defined]
    assert len(graphs) == 3 and all(g is not None for g in graphs.values()), graphs
