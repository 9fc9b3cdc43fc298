"""Forward passes replayed as CUDA graphs (cuda_graphs.py). Recording and replaying need a
CUDA GPU, so those tests skip on a machine without one (scripts/gpu_check.sh runs them on
a GPU host); the check that decides whether a graph is used runs anywhere."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from gannet.cuda_graphs import agrees, difference
from gannet.model_cache import ModelKey, yolo_loader
from gannet.settings import REPO_ROOT

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODELS = REPO_ROOT / "models" / "demo"


def _network(
    cuda_graphs: bool, weights: str, task: str, imgsz: int, device: str = "cuda:0"
) -> torch.nn.Module:
    """A demo model's network as the ModelCache's loader leaves it on `device`."""
    load = yolo_loader(lambda uri, version: Path(uri), trace=True, cuda_graphs=cuda_graphs)
    key = ModelKey(str(MODELS / weights), "v", device, imgsz, task)
    model, _ = load(key)
    network: torch.nn.Module = model.predictor.model.backend.model
    return network


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


@needs_cuda
@pytest.mark.parametrize(
    ("weights", "task", "imgsz"), [("detect.pt", "detect", 640), ("segment.pt", "segment", 320)]
)
def test_replayed_graphs_answer_as_the_plain_pass_and_keep_earlier_answers(
    weights: str, task: str, imgsz: int
) -> None:
    """Each batch shape gets its own graph, its answers match the plain traced pass (also
    after another shape's graph has replaced the head's anchors), and an answer handed
    out stays as it was after the next batch of that shape replays (a runner reads its
    answer after the batcher has moved on)."""
    graphed = _network(True, weights, task, imgsz)
    plain = _network(False, weights, task, imgsz)
    short = imgsz * 3 // 4 // 32 * 32  # a multiple of the models' stride
    torch.manual_seed(0)
    with torch.inference_mode():
        for rows, height in ((1, imgsz), (3, short), (1, imgsz), (3, short), (8, imgsz)):
            x = torch.rand(rows, 3, height, imgsz, device="cuda:0", dtype=torch.float16)
            first = _first(graphed(x)).clone()
            want = _first(plain(x))
            assert agrees(want, first, atol=1e-2), difference(want, first, atol=1e-2)
            answer = _first(graphed(x))
            graphed(torch.rand_like(x))  # the next batch of the same shape
            torch.testing.assert_close(answer, first, atol=0, rtol=0)
    graphs = graphed._graphs  # type: ignore[attr-defined]
    assert len(graphs) == 3 and all(g is not None for g in graphs.values()), graphs
    # The memory `gannet bench` reports: the three inputs (FP16), and the pool beside.
    inputs = sum(
        2 * rows * 3 * height * imgsz for rows, height in {(1, imgsz), (3, short), (8, imgsz)}
    )
    assert graphed.held_bytes() > inputs  # type: ignore[operator]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_model_on_another_gpu_than_the_first_replays_graphs_of_its_own_batches() -> None:
    """A batcher thread's current device is cuda:0, whatever its model's. Captured on a
    stream of that device, a graph of a model on cuda:1 recorded none of its kernels
    (torch only warns that the graph is empty), the check passed (the answer it compared
    was the eager pass's, run during the capture), and every later batch of the shape was
    answered with the recording batch's boxes. Each batch here is new: its answer must be
    the plain pass's. Recorded in a thread of its own, as a batcher records."""
    device = f"cuda:{torch.cuda.device_count() - 1}"
    graphed = _network(True, "detect.pt", "detect", 640, device)
    plain = _network(False, "detect.pt", "detect", 640, device)
    answers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def batches() -> None:
        with torch.inference_mode():
            for _ in range(3):
                x = torch.rand(2, 3, 480, 640, device=device, dtype=torch.float16)
                answers.append((_first(plain(x)), _first(graphed(x)).clone()))

    thread = threading.Thread(target=batches)
    thread.start()
    thread.join()
    assert len(answers) == 3
    for want, got in answers:
        assert agrees(want, got, atol=1e-2), difference(want, got, atol=1e-2)
    assert graphed.recorded() >= 1  # type: ignore[operator]


@needs_cuda
def test_shapes_past_the_cap_run_the_trace_and_say_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A model keeps at most MAX_GRAPHS graphs (each holds GPU memory); a shape past the
    cap still gets the trace's answer, and the operator reads one warning, not one per
    batch."""
    import gannet.cuda_graphs as cuda_graphs

    graphed = _network(True, "detect.pt", "detect", 640)
    plain = _network(False, "detect.pt", "detect", 640)
    known = len(graphed._graphs)  # type: ignore[attr-defined] # the loader's warm-up shape
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", known + 1)
    with torch.inference_mode(), caplog.at_level("WARNING", logger="gannet.cuda_graphs"):
        for rows in (1, 2, 3, 2, 3):  # 1: the cap's last graph; 2 and 3 past it
            x = torch.rand(rows, 3, 480, 640, device="cuda:0", dtype=torch.float16)
            got, want = _first(graphed(x)), _first(plain(x))
            assert agrees(want, got, atol=1e-2), difference(want, got, atol=1e-2)
    assert graphed.recorded() == known + 1  # type: ignore[operator]
    assert len(graphed._graphs) == known + 3  # type: ignore[attr-defined]
    warned = [r for r in caplog.records if "run the traced pass" in r.getMessage()]
    assert len(warned) == 1, caplog.text


def test_the_check_takes_fp16_noise_and_refuses_a_grid_of_another_shape() -> None:
    """The hazard a graph brings: the detection head caches its anchor grid per input
    shape, and a graph reads the grid it was recorded with. 480x640 and 640x480 inputs
    have as many anchors, so a stale grid gives answers of the right size, with boxes in
    the wrong places: the check must refuse that, yet take the same answers rounded to
    FP16 (what a graph's kernels change)."""
    from ultralytics import YOLO

    model = YOLO(str(MODELS / "detect.pt"))
    net = model.model.eval()
    head = net.model[-1]
    wide, tall = torch.rand(1, 3, 480, 640), torch.rand(1, 3, 640, 480)
    with torch.inference_mode():
        right = net(wide)[0]
        wide_grid = head.shape
        net(tall)  # the head's grid is now the tall one's
        head.shape = wide_grid  # as a graph recorded on the tall shape would read it
        stale = net(wide)[0]
    assert stale.shape == right.shape
    assert agrees(right, right.half().float(), atol=1e-2), difference(right, right.half(), 1e-2)
    assert not agrees(right, stale, atol=1e-2), difference(right, stale, 1e-2)
