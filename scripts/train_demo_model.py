#!/usr/bin/env python3
"""Train Gannet's demo YOLO models on synthetic scenes, offline, on a CPU.

The demo, the tests and the benchmark need real models whose answers are known in
advance. This script draws a synthetic world (scripts/synthetic_scenes.py: textured
ground, large pale "patch" polygons, small red/blue/yellow circles, squares and
triangles), trains three small Ultralytics models on it and writes:

  models/demo/detect.pt    detect   classes circle, square, triangle
  models/demo/segment.pt   segment  class patch (instance masks of the pale polygons)
  models/demo/classify.pt  classify classes blue, red, yellow (crops around shapes)
  models/demo/training.json + README.md   how each model was made and how well it does
  samples/*.jpg + samples/manifest.json   images (different seed) with exact ground truth

Offline, by construction (the training machine has no internet, and neither must the
daemon): before ultralytics is imported we set YOLO_OFFLINE=1 (ultralytics' is_online()
returns False, so no update checks, telemetry or hub calls) and point YOLO_CONFIG_DIR at
a folder in the workdir. Models are built from ultralytics' bundled YAMLs, never from a
.pt that it would download. ultralytics.data.utils.check_det_dataset() always calls
check_font("Arial.ttf"), which looks in YOLO_CONFIG_DIR/Ultralytics/ first and otherwise
tries to download the font; we put a copy of DejaVuSans.ttf (from matplotlib, which
ultralytics depends on, or from /usr/share/fonts) there under the name Arial.ttf, so the
check is satisfied locally. plots=False keeps the trainer from drawing anything else.
amp=False skips check_amp(), which on a GPU would fetch yolo26n.pt to test AMP.

Reproducible: scenes, datasets and samples are bit-for-bit functions of their seeds
(training --seed, samples a different, fixed one), and ultralytics trains with seed=0,
deterministic=True, workers=0 on the CPU. A run continued with --resume is not bit-exact.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_scenes as ss  # sibling module: scripts/ is not a package

LOG = logging.getLogger("train_demo_model")
REPO = Path(__file__).resolve().parent.parent

TASKS = ("detect", "segment", "classify")
TRAIN_SEED = 0
DATA_VERSION = 3  # bump when the training scene distribution changes (dataset cache key)
SAMPLES_SEED = 20240611  # deliberately unrelated to TRAIN_SEED: samples are unseen scenes
VAL_FRACTION = 0.15
JPEG_QUALITY = 90

# Per task: architecture (a YAML bundled with ultralytics, optionally re-scaled to a
# narrower width), image size, and the defaults that train to exact answers on the
# samples within ~15 minutes on 2 CPU cores. Width 0.125 (half of YOLOv8n) halves the
# CPU time per step, which buys more steps; the scenes are simple enough not to need more.
TASK_CONFIG: dict[str, dict[str, Any]] = {
    "detect": {
        "base_yaml": "v8/yolov8.yaml",
        "width": 0.125,
        "imgsz": 416,  # at 320 the smallest shapes (24 px -> 12 px) got confused
        "epochs": 20,
        "images": 600,
        "batch": 16,
    },
    "segment": {
        "base_yaml": "v8/yolov8-seg.yaml",
        "width": 0.125,
        "imgsz": 320,
        "epochs": 15,
        "images": 600,
        "batch": 16,
    },
    "classify": {
        "base_yaml": "v8/yolov8-cls.yaml",
        "width": None,  # yolov8n-cls as is: at 64 px it is already quick
        "imgsz": 64,
        "epochs": 10,
        "images": 500,
        "batch": 64,
    },
}
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "detect": ss.DETECT_CLASSES,
    "segment": ss.SEGMENT_CLASSES,
    "classify": ss.COLOR_CLASSES,
}
# Normal-size samples: (patches, shapes) chosen to cover empty ground, crowded scenes and
# a scene with patches but no shapes (false positives would show up there).
SAMPLE_LAYOUT: tuple[tuple[int, int], ...] = ((2, 6), (0, 8), (3, 5), (1, 7), (2, 0), (1, 4))
LARGE_SIZE = (2400, 1800)
LARGE_LAYOUT = (10, 60)
CONF = 0.5
CROP_PAD = 0.2


def configure_offline_ultralytics(workdir: Path) -> None:
    """Make ultralytics unable to reach the network before it is imported (see module doc)."""
    os.environ["YOLO_OFFLINE"] = "1"
    config_dir = workdir / "ultralytics-config"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    font_dir = config_dir / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    source = _local_font()
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = font_dir / name
        if not target.exists():
            shutil.copyfile(source, target)


def _local_font() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    candidates = []
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "mpl-data/fonts/ttf/DejaVuSans.ttf")
    candidates.append(Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"))
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no local TTF font to stand in for Arial.ttf; looked at {candidates}")


def model_yaml(task: str, workdir: Path) -> str:
    """The model definition to build from: a bundled YAML, or a copy with a custom scale.

    ultralytics picks a scale from the file name (yolov8n -> n) and otherwise takes the
    first entry of ``scales``, so a copy whose only scale is ours, under a name without a
    scale letter, builds exactly that width.
    """
    import ultralytics
    import yaml

    cfg = TASK_CONFIG[task]
    base = Path(ultralytics.__file__).parent / "cfg/models" / cfg["base_yaml"]
    if cfg["width"] is None:
        return base.stem.replace("yolov8", "yolov8n") + ".yaml"
    definition = yaml.safe_load(base.read_text())
    definition["scales"] = {"t": [0.33, cfg["width"], 1024]}
    path = workdir / "models" / f"gannet-demo-{task}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(definition, sort_keys=False))
    return str(path)


def _import_yolo(workdir: Path) -> Any:
    """Import ultralytics only after the environment is set, and keep its state in workdir."""
    from ultralytics import YOLO, settings

    settings.update(
        {
            "datasets_dir": str(workdir / "datasets"),
            "weights_dir": str(workdir / "weights"),
            "runs_dir": str(workdir / "runs"),
            "sync": False,
            "clearml": False,
            "comet": False,
            "dvc": False,
            "mlflow": False,
            "raytune": False,
            "tensorboard": False,
            "wandb": False,
        }
    )
    return YOLO


# --------------------------------------------------------------------------- datasets


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {path}")


def _scenes(n_images: int, seed: int) -> Any:
    """Yield (index, split, scene); each scene has its own seed so any subset is reproducible.

    Training scenes stay inside the world the samples come from (0-8 shapes of 24-70 px)
    but lean towards busy scenes and small shapes: on 2 CPU cores every training step
    counts, and small shapes crowded together on a patch are where the detector was
    still making mistakes.
    """
    n_val = max(1, round(n_images * VAL_FRACTION))
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        split = "val" if i < n_val else "train"
        n_shapes = int(rng.integers(0, 3)) if rng.random() < 0.1 else int(rng.integers(3, 9))
        on_patch = float(rng.uniform(0.3, 0.85))
        scene = ss.make_scene(rng, n_shapes=n_shapes, small_bias=True, on_patch_prob=on_patch)
        yield i, split, scene


def build_dataset(task: str, workdir: Path, n_images: int, seed: int) -> Path:
    """Write the task's dataset under workdir (reused when already complete); return the
    path ultralytics' ``data=`` wants (data.yaml for detect/segment, the root for classify)."""
    root = workdir / "datasets" / f"{task}-v{DATA_VERSION}-n{n_images}-s{seed}"
    stamp = root / ".complete"
    target = root if task == "classify" else root / "data.yaml"
    if stamp.exists():
        LOG.info("reusing dataset %s", root)
        return target
    if root.exists():
        shutil.rmtree(root)
    LOG.info("generating %d synthetic scenes for %s into %s", n_images, task, root)
    t0 = time.monotonic()
    n_objects = 0
    for i, split, scene in _scenes(n_images, seed):
        if task == "classify":
            crop_rng = np.random.default_rng([seed, i, 1])
            for j, shape in enumerate(scene.shapes):
                for k in range(2):  # two framings of each shape: padding and offset vary
                    pad = crop_rng.uniform(0.05, 0.45)
                    shift = tuple(crop_rng.uniform(-0.12, 0.12, 2))
                    crop = ss.shape_crop(scene.image, shape.bbox, pad, shift)  # type: ignore[arg-type]
                    crop = cv2.resize(crop, (80, 80), interpolation=cv2.INTER_AREA)
                    _write_jpeg(root / split / shape.color / f"{i:05d}_{j}_{k}.jpg", crop)
                    n_objects += 1
        else:
            _write_jpeg(root / "images" / split / f"{i:05d}.jpg", scene.image)
            labels = (
                ss.yolo_detect_labels(scene) if task == "detect" else ss.yolo_segment_labels(scene)
            )
            n_objects += len(scene.shapes) if task == "detect" else len(scene.patches)
            label_path = root / "labels" / split / f"{i:05d}.txt"
            label_path.parent.mkdir(parents=True, exist_ok=True)
            label_path.write_text(labels)
        if (i + 1) % 200 == 0:
            LOG.info("  %d/%d scenes", i + 1, n_images)
    if task != "classify":
        names = "\n".join(f"  {k}: {v}" for k, v in enumerate(CLASS_NAMES[task]))
        (root / "data.yaml").write_text(
            f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n"
        )
    stamp.write_text("ok\n")
    LOG.info("dataset ready: %d objects in %.1fs", n_objects, time.monotonic() - t0)
    return target


# --------------------------------------------------------------------------- samples


def write_samples(samples_dir: Path, seed: int = SAMPLES_SEED) -> dict[str, Any]:
    """Draw the sample images and their manifest; deterministic for a given seed."""
    samples_dir.mkdir(parents=True, exist_ok=True)
    for old in samples_dir.glob("*.jpg"):
        old.unlink()
    entries = []
    for i, (n_patches, n_shapes) in enumerate(SAMPLE_LAYOUT, start=1):
        rng = np.random.default_rng([seed, i])
        scene = ss.make_scene(rng, n_patches=n_patches, n_shapes=n_shapes)
        name = f"scene_{i:02d}.jpg"
        _write_jpeg(samples_dir / name, scene.image)
        entries.append({**ss.manifest_entry(scene, name), "kind": "normal"})
    rng = np.random.default_rng([seed, 0])
    scene = ss.make_scene(rng, *LARGE_SIZE, n_patches=LARGE_LAYOUT[0], n_shapes=LARGE_LAYOUT[1])
    _write_jpeg(samples_dir / "large_01.jpg", scene.image)
    entries.append({**ss.manifest_entry(scene, "large_01.jpg"), "kind": "large"})
    manifest = {
        "generator": "scripts/train_demo_model.py --task samples (scripts/synthetic_scenes.py)",
        "seed": seed,
        "classes": {task: list(names) for task, names in CLASS_NAMES.items()},
        "notes": (
            "bbox is [x1, y1, x2, y2] in pixels with x2/y2 exclusive (tight box of the filled "
            "shape). patch is the index into this image's patches of the patch the shape lies "
            "wholly on, or null if it lies wholly off every patch. A patch's area is the number "
            "of pixels cv2.fillPoly sets for its integer polygon (shapes drawn on top included). "
            "kind 'large' images keep shapes at the same pixel size and are meant for sliced "
            "detection."
        ),
        "images": entries,
    }
    (samples_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in samples_dir.iterdir())
    LOG.info("wrote %d samples to %s (%.2f MB)", len(entries), samples_dir, total / 1e6)
    for e in entries:
        LOG.info(
            "  %s %dx%d counts=%s patches=%d",
            e["file"],
            e["width"],
            e["height"],
            e["counts"],
            e["patch_count"],
        )
    return manifest


# --------------------------------------------------------------------------- checks


def sliced_counts(model: Any, image: np.ndarray, imgsz: int) -> dict[str, int]:
    """Per-class counts on a large image from 640x480 tiles, the way docs/pipelines.md describes.

    Tiles overlap by at least 120 px (more than the largest shape), so every shape lies
    whole in some tile; boxes touching an interior tile edge are cut shapes and dropped.
    """
    import torch
    import torchvision

    tw, th, overlap, edge = 640, 480, 120, 2
    h, w = image.shape[:2]

    def starts(size: int, tile: int) -> list[int]:
        out = list(range(0, max(1, size - tile + 1), tile - overlap))
        if out[-1] + tile < size:
            out.append(size - tile)
        return out

    boxes, scores, classes = [], [], []
    for y in starts(h, th):
        for x in starts(w, tw):
            r = model.predict(image[y : y + th, x : x + tw], imgsz=imgsz, conf=CONF, verbose=False)
            b = r[0].boxes
            xyxy = b.xyxy.clone()
            keep = torch.ones(len(xyxy), dtype=torch.bool)
            if x > 0:
                keep &= xyxy[:, 0] > edge
            if y > 0:
                keep &= xyxy[:, 1] > edge
            if x + tw < w:
                keep &= xyxy[:, 2] < tw - edge
            if y + th < h:
                keep &= xyxy[:, 3] < th - edge
            xyxy = xyxy[keep] + torch.tensor([x, y, x, y], dtype=xyxy.dtype)
            boxes.append(xyxy)
            scores.append(b.conf[keep])
            classes.append(b.cls[keep])
    all_boxes, all_scores = torch.cat(boxes), torch.cat(scores)
    kept = torchvision.ops.nms(all_boxes, all_scores, 0.5)
    counts = {name: 0 for name in ss.DETECT_CLASSES}
    for c in torch.cat(classes)[kept].tolist():
        counts[model.names[int(c)]] += 1
    return counts


def check_samples(task: str, weights: Path, samples_dir: Path, yolo: Any) -> tuple[bool, list[str]]:
    """The same acceptance checks the tests make, run right after training for fast feedback."""
    manifest = json.loads((samples_dir / "manifest.json").read_text())
    model = yolo(str(weights))
    imgsz = TASK_CONFIG[task]["imgsz"]
    ok, lines = True, []
    for entry in manifest["images"]:
        image = cv2.imread(str(samples_dir / entry["file"]))
        if entry["kind"] != "normal":
            if task == "detect":  # informational: slicing is the pipeline's job, not ours
                got = sliced_counts(model, image, imgsz)
                tag = "same" if got == entry["counts"] else "differs"
                lines.append(f"info {entry['file']} sliced: expected {entry['counts']} got {got}")
                lines[-1] += f" ({tag})"
            continue
        if task == "detect":
            r = model.predict(image, imgsz=imgsz, conf=CONF, verbose=False)[0]
            got = {name: 0 for name in ss.DETECT_CLASSES}
            for c in r.boxes.cls.tolist():
                got[r.names[int(c)]] += 1
            good = got == entry["counts"]
            lines.append(f"{entry['file']}: expected {entry['counts']} got {got}")
        elif task == "segment":
            r = model.predict(image, imgsz=imgsz, conf=CONF, retina_masks=True, verbose=False)[0]
            masks = [] if r.masks is None else [m.cpu().numpy() > 0.5 for m in r.masks.data]
            expected = [p["area"] for p in entry["patches"]]
            got_areas = sorted(int(m.sum()) for m in masks)
            good = len(masks) == len(expected)
            ratios = []
            for p in entry["patches"]:
                truth = np.zeros(image.shape[:2], dtype=np.uint8)
                cv2.fillPoly(truth, [np.array(p["polygon"], dtype=np.int32)], 1)
                best = (
                    max((int((m & truth.astype(bool)).sum()), int(m.sum())) for m in masks)
                    if masks
                    else (0, 0)
                )
                ratio = best[1] / p["area"]
                ratios.append(round(ratio, 3))
                good = good and abs(ratio - 1.0) <= 0.10 and best[0] > 0.8 * p["area"]
            lines.append(
                f"{entry['file']}: expected {len(expected)} patches {sorted(expected)} "
                f"got {len(masks)} {got_areas} area ratios {ratios}"
            )
        else:
            crops = [ss.shape_crop(image, s["bbox"], CROP_PAD) for s in entry["shapes"]]
            want = [s["color"] for s in entry["shapes"]]
            got_colors = []
            if crops:
                results = model.predict(crops, imgsz=imgsz, verbose=False)
                got_colors = [r.names[int(r.probs.top1)] for r in results]
            good = got_colors == want
            lines.append(f"{entry['file']}: expected {want} got {got_colors}")
        ok = ok and good
        lines.append(("PASS " if good else "FAIL ") + lines.pop())
    return ok, lines


# --------------------------------------------------------------------------- training


def train(task: str, args: argparse.Namespace, yolo: Any) -> dict[str, Any]:
    cfg = TASK_CONFIG[task]
    epochs = args.epochs or cfg["epochs"]
    n_images = args.images or cfg["images"]
    data = build_dataset(task, args.workdir, n_images, args.seed)
    arch = model_yaml(task, args.workdir)
    run_dir = args.workdir / "runs" / task
    last = run_dir / "weights" / "last.pt"
    if args.resume:
        if not last.is_file():
            raise SystemExit(f"--resume: no interrupted run at {last}")
        # results.csv's time column is the run's training time so far; a resumed run
        # restarts that clock, so carry the earlier part over by hand.
        rows = (run_dir / "results.csv").read_text().strip().splitlines()
        earlier = float(rows[-1].split(",")[1]) if len(rows) > 1 else 0.0
        LOG.info("resuming %s from %s (%.0fs of training already done)", task, last, earlier)
        model = yolo(str(last))
        t0 = time.monotonic() - earlier
        metrics = model.train(resume=True)
    else:
        model = yolo(arch, task=task)
        LOG.info(
            "training %s: %s imgsz=%d epochs=%d images=%d",
            task,
            arch,
            cfg["imgsz"],
            epochs,
            n_images,
        )
        t0 = time.monotonic()
        metrics = model.train(
            data=str(data),
            epochs=epochs,
            imgsz=cfg["imgsz"],
            batch=cfg["batch"],
            workers=0,
            device="cpu",
            amp=False,
            plots=False,
            seed=0,
            deterministic=True,
            project=str(args.workdir / "runs"),
            name=task,
            exist_ok=True,
            patience=max(epochs, 50),
            close_mosaic=min(10, max(1, epochs // 4)),
            # ultralytics accumulates gradients up to a nominal batch of 64 by default; with
            # few images and epochs that leaves too few optimizer steps, so step every batch.
            nbs=cfg["batch"],
            scale=0.3,  # the smallest shapes are ~15 px at imgsz; do not shrink them by half
            cache="ram",  # decode + resize each JPEG once, not once per epoch
            verbose=False,
        )
    seconds = time.monotonic() - t0
    best = Path(model.trainer.best)
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"{task}.pt"
    shutil.copyfile(best, dest)
    size = dest.stat().st_size
    results = {k: round(float(v), 4) for k, v in metrics.results_dict.items()}
    LOG.info("%s trained in %.0fs -> %s (%.2f MB)", task, seconds, dest, size / 1e6)
    LOG.info("%s validation metrics: %s", task, json.dumps(results))
    if size > 10 * 1024 * 1024:
        raise SystemExit(f"{dest} is {size} bytes, over the 10 MB budget")
    checks: list[str] = []
    passed = None
    if (args.samples / "manifest.json").exists():
        passed, checks = check_samples(task, dest, args.samples, yolo)
        for line in checks:
            LOG.info("  %s", line)
        LOG.info("%s sample checks: %s", task, "PASS" if passed else "FAIL")
    import torch
    import ultralytics

    return {
        "file": dest.name,
        "task": task,
        "classes": list(CLASS_NAMES[task]),
        "architecture": (
            f"{cfg['base_yaml']} at width {cfg['width']}" if cfg["width"] else Path(arch).name
        ),
        "imgsz": cfg["imgsz"],
        "epochs": epochs,
        "images": n_images,
        "seed": args.seed,
        "train_seconds": round(seconds),
        "size_bytes": size,
        "metrics": results,
        "resumed": bool(args.resume),
        "sample_checks_passed": passed,
        "sample_checks": checks,
        "command": (
            f"YOLO_OFFLINE=1 .venv/bin/python scripts/train_demo_model.py --task {task} "
            f"--out models/demo --epochs {epochs} --images {n_images}"
        ),
        "versions": {"ultralytics": ultralytics.__version__, "torch": torch.__version__},
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
    }


def write_readme(out: Path, records: dict[str, Any]) -> None:
    """README.md is rendered from training.json so the numbers in it are the measured ones."""
    lines = [
        "# Demo models",
        "",
        "Small Ultralytics YOLO models trained on CPU on synthetic scenes by",
        "`scripts/train_demo_model.py` (scene generator: `scripts/synthetic_scenes.py`).",
        "The scenes are a textured background with large pale polygons (*patches*) and small",
        "saturated circles, squares and triangles coloured red, blue or yellow. `samples/`",
        "holds unseen scenes (different seed) with exact ground truth in",
        "`samples/manifest.json`; `tests/test_demo_models.py` checks these models against it.",
        "",
        "Offline use: set `YOLO_OFFLINE=1` before importing ultralytics. Loading these",
        "files and `predict()` then make no network call at all (checked with sockets",
        "disabled). `Results.plot()` and validation call `check_font()`, which sends a HEAD",
        "request to github.com for `Arial.ttf` unless that file is in",
        "`$YOLO_CONFIG_DIR/Ultralytics/`; any TTF copied there under that name will do (the",
        "training script copies DejaVuSans). Pass the `imgsz` below (it is also stored in each",
        "checkpoint's train args, which `YOLO(path)` uses as its default).",
        "",
        "How the samples are meant to be checked (as `tests/test_demo_models.py` does):",
        "",
        "- detect: `predict(image, imgsz=416, conf=0.5)` gives exactly the manifest's per-class",
        "  `counts` on every 640x480 sample. For `large_01.jpg` (2400x1800, same shape sizes)",
        "  slice into 640x480 tiles overlapping by at least 120 px (more than the largest shape,",
        "  70 px, so every shape lies whole in some tile), drop boxes that touch an interior",
        "  tile edge (they are cut shapes, which the model still reports, sometimes as another",
        "  class), then merge the rest with NMS at IoU 0.5. The `info` line under detect below",
        "  shows how close that gets (`sliced_counts()` in the training script): not always",
        "  exact, because a few small squares crowded on a patch flip to circle depending on",
        "  where the tile cuts, so compare sliced counts on it with a small tolerance.",
        "- segment: `predict(image, imgsz=320, conf=0.5, retina_masks=True)`: one mask per",
        "  patch; with `retina_masks` the mask pixel count is directly comparable to the",
        "  manifest's `area`.",
        "- classify: a square crop centred on the shape's box, side = longer box side x 1.4",
        "  (20% padding each side; `shape_crop()` in `scripts/synthetic_scenes.py`), at imgsz 64.",
        "  Padding from 0 to 40% works as well.",
        "",
        "Retrain everything (samples, then the three models; ~30 min on 2 CPU cores). If a",
        "run is killed, add `--resume` to the same `--task` command to continue it:",
        "",
        "```",
        "YOLO_OFFLINE=1 .venv/bin/python scripts/train_demo_model.py --task all --out models/demo",
        "```",
        "",
    ]
    for task in TASKS:
        rec = records.get(task)
        if rec is None:
            continue
        metrics = "\n".join(f"  - `{k}`: {v}" for k, v in rec["metrics"].items())
        checks = "\n".join(f"  - {c}" for c in rec["sample_checks"]) or "  - (not run)"
        lines += [
            f"## `{rec['file']}` ({task})",
            "",
            f"- classes (index order): {', '.join(rec['classes'])}",
            f"- imgsz: {rec['imgsz']}",
            f"- architecture: `{rec['architecture']}`, {rec['size_bytes'] / 1e6:.1f} MB",
            f"- trained: {rec['epochs']} epochs on {rec['images']} synthetic scenes "
            f"(seed {rec['seed']}, {VAL_FRACTION:.0%} held out for validation) in "
            f"{rec['train_seconds'] / 60:.1f} min"
            + (
                " (killed once and continued with --resume; time of both parts)"
                if rec.get("resumed")
                else ""
            )
            + f" on {rec['machine']} "
            f"(ultralytics {rec['versions']['ultralytics']}, torch {rec['versions']['torch']})",
            f"- retrain: `{rec['command']}`",
            "- validation metrics:",
            metrics,
            "- checks on the normal-size samples "
            + ("(passed):" if rec["sample_checks_passed"] else "(FAILED):"),
            checks,
            "",
        ]
    (out / "README.md").write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Generate synthetic scenes and train Gannet's demo YOLO models on the CPU, fully "
            "offline. 'samples' writes samples/*.jpg and samples/manifest.json (unseen scenes "
            "with exact ground truth); detect/segment/classify train one model and copy its "
            "best.pt to OUT/<task>.pt, then check it against the samples; 'all' does samples "
            "and then every model. Datasets and ultralytics runs go to WORKDIR (not in git)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--task", choices=(*TASKS, "samples", "all"), required=True)
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "models/demo",
        help="where <task>.pt, training.json and README.md are written",
    )
    epochs = ", ".join(f"{t} {TASK_CONFIG[t]['epochs']}" for t in TASKS)
    images = ", ".join(f"{t} {TASK_CONFIG[t]['images']}" for t in TASKS)
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"training epochs (default per task: {epochs})"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help=f"synthetic scenes to generate, {round(VAL_FRACTION * 100)}%% of them held out for "
        f"validation (default per task: {images}; classify trains on two crops of every shape)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "build/demo-train",
        help="datasets, ultralytics runs and settings (git-ignored)",
    )
    parser.add_argument(
        "--samples",
        type=Path,
        default=REPO / "samples",
        help="sample images and manifest.json, written by --task samples/all "
        "and used to check each trained model",
    )
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help="training scenes seed")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run of --task (WORKDIR/runs/<task>/weights/last.pt) with "
        "the settings it was started with",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.workdir = args.workdir.resolve()
    args.out = args.out.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    configure_offline_ultralytics(args.workdir)
    if args.task in ("samples", "all"):
        write_samples(args.samples)
    tasks = TASKS if args.task == "all" else (args.task,) if args.task in TASKS else ()
    if not tasks:
        return 0
    yolo = _import_yolo(args.workdir)
    record_file = args.out / "training.json"
    records = json.loads(record_file.read_text()) if record_file.exists() else {}
    failed = []
    for task in tasks:
        records[task] = train(task, args, yolo)
        record_file.write_text(json.dumps(records, indent=1) + "\n")
        write_readme(args.out, records)
        if records[task]["sample_checks_passed"] is False:
            failed.append(task)
    for task in tasks:
        LOG.info("%s: %s", task, json.dumps(records[task]["metrics"]))
    if failed:
        LOG.error("sample checks failed for: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
