"""The Space (`spaces_app/app.py`) served on loopback and called through `gradio_client`.

A tiny random model is saved to a folder with calibration for both categories and loaded by the app
the way a Space loads it (`AutoModel.from_pretrained(..., trust_remote_code=True)`). One server is
shared by the module; every test goes through the public `/predict` endpoint.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import tiny_config

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")

ROOT = Path(__file__).resolve().parents[1]
APP_FILE = ROOT / "spaces_app" / "app.py"
EXAMPLES = ROOT / "spaces_app" / "examples"
GOOD = EXAMPLES / "pushpins_good.png"
LOGICAL = EXAMPLES / "pushpins_logical.png"
CATEGORY = "pushpins"
NUM_MASKS = 6
# Output order of /predict: verdict, details, logical map, structural map, 3 mask views, 3 charts, JSON.
VERDICT, DETAILS, LOGICAL_MAP, STRUCTURAL_MAP, RAW = 0, 1, 2, 3, 10


def load_app_module():
    """Import spaces_app/app.py as a module (the Space root is not a package)."""
    spec = importlib.util.spec_from_file_location("ladmim_space_app", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def saturated_noise(path: Path, seed: int = 0, size: int = 64) -> Path:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) > 0.5).astype(np.uint8) * 255
    Image.fromarray(pixels).save(path)
    return path


def raw_scores(model, processor, path: Path, category: str = CATEGORY, seed: int = 0) -> dict:
    """What the model itself says about an image file (the reference the app must reproduce)."""
    from ladmim_hf import load_image

    out = model(**processor(load_image(path)), category=category, num_masks=NUM_MASKS, seed=[seed])
    return {"pred_score": float(out.pred_score[0]), "logical_score": float(out.logical_score[0]),
            "structural_score": float(out.structural_score[0]), "pred_label": bool(out.pred_label[0])}


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    from ladmim_hf import LadmimForAnomalyDetection, LadmimImageProcessor

    work = tmp_path_factory.mktemp("space")
    torch.manual_seed(0)
    config = tiny_config(num_masks=NUM_MASKS)
    model = LadmimForAnomalyDetection(config).eval()
    processor = LadmimImageProcessor(size=64)

    # Expected direction, made to hold for any weights. A random tiny model ranks images arbitrarily
    # (one random tokenizer maps a good, a logical, a white, a black and a noise image to identical
    # codes; the structural error of saturated noise vs. a smooth image flips sign across seeds), so
    # no image pair is "more anomalous" for every random model. What the app is responsible for is
    # the calibrated direction: z = (score - normal mean) / normal std, fused = z_logical +
    # z_structural, anomalous iff fused > threshold. So the calibration is crafted from the model's
    # own structural scores (which do not depend on the random masks): the lower-scoring of a white
    # image and saturated noise is put at the normal mean (z = 0) and the other 10 standard
    # deviations above it; the logical branch gets a huge std (it moves the fused score by < 0.01).
    # The app must then call exactly that image anomalous, the other normal, and rank them.
    white = work / "white.png"
    Image.new("RGB", (64, 64), "white").save(white)
    noise = saturated_noise(work / "noise.png")
    structural = {path: raw_scores(model, processor, path)["structural_score"] for path in (white, noise)}
    low, high = sorted(structural, key=structural.get)
    gap = structural[high] - structural[low]
    assert gap > 1e-4, f"the tiny model gives the two images the same structural score {structural}"
    pushpins = {"logical_mean": 1.0, "logical_std": 1000.0, "structural_mean": structural[low],
                "structural_std": gap / 10.0, "threshold": 5.0}
    breakfast = {"logical_mean": 1.0, "logical_std": 0.5, "structural_mean": structural[low],
                 "structural_std": 1.0, "threshold": 3.0}
    model.config.calibration = {CATEGORY: pushpins, "breakfast_box": breakfast}

    model_dir = work / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)

    app = load_app_module()
    demo = app.build_demo(str(model_dir))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, **app.launch_kwargs())
    client = gradio_client.Client(url, verbose=False, download_files=str(work / "downloads"),
                                  analytics_enabled=False)
    try:
        yield {"app": app, "url": url, "client": client, "model": model, "processor": processor, "work": work,
               "low": low, "high": high, "model_dir": model_dir}
    finally:
        demo.close()


def predict(space, image, category=CATEGORY, num_masks=NUM_MASKS, threshold=None, seed=0):
    handle = gradio_client.handle_file(str(image)) if image is not None else None
    return space["client"].predict(handle, category, num_masks, threshold, seed, api_name="/predict")


def assert_ok(result) -> dict:
    raw = result[RAW]
    assert raw["status"] == "ok", raw
    assert "Traceback" not in result[VERDICT] + result[DETAILS]
    return raw


def assert_error(result, *fragments: str) -> str:
    raw = result[RAW]
    assert raw["status"] == "error", raw
    message = raw["message"]
    assert "Traceback" not in message and "File \"" not in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    assert message in result[VERDICT]
    assert all(item is None for item in result[LOGICAL_MAP:RAW]), result
    return message


def test_endpoint_signature(space):
    info = space["client"].view_api(print_info=False, return_format="dict")["named_endpoints"]["/predict"]
    assert [p["parameter_name"] for p in info["parameters"]] == ["image", "category", "num_masks", "threshold", "seed"]


def test_good_and_logical_examples_score_as_the_model_does(space):
    good, logical = predict(space, GOOD), predict(space, LOGICAL)
    scores = {}
    for path, result in ((GOOD, good), (LOGICAL, logical)):
        raw = assert_ok(result)
        expected = raw_scores(space["model"], space["processor"], path)
        for key in ("pred_score", "logical_score", "structural_score"):
            assert raw[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), key
        assert (raw["verdict"] == "anomalous") == expected["pred_label"]
        scores[path] = raw["pred_score"]
        # every picture is there: 2 heat maps, 3 outlined masks, 3 charts (6 masks >= 3)
        for item in result[LOGICAL_MAP:RAW]:
            assert item and Path(item).is_file(), result
        with Image.open(result[STRUCTURAL_MAP]) as heat, Image.open(path) as source:
            assert heat.size == source.size
        assert "Logical branch" in result[DETAILS] and "Structural branch" in result[DETAILS]
        assert [m["rank"] for m in raw["top_masks"]] == [1, 2, 3]
        top = [m["score"] for m in raw["top_masks"]]
        assert top == sorted(top, reverse=True)
    assert scores[GOOD] != pytest.approx(scores[LOGICAL], abs=1e-6)


def test_calibrated_direction_and_verdict(space):
    low, high = predict(space, space["low"]), predict(space, space["high"])
    low_raw, high_raw = assert_ok(low), assert_ok(high)
    assert high_raw["pred_score"] > low_raw["pred_score"] + 5.0
    assert high_raw["z_structural"] == pytest.approx(10.0, rel=1e-3)
    assert low_raw["z_structural"] == pytest.approx(0.0, abs=1e-3)
    assert abs(high_raw["z_logical"]) < 0.01 and abs(low_raw["z_logical"]) < 0.01
    assert (high_raw["verdict"], low_raw["verdict"]) == ("anomalous", "normal")
    assert "ANOMALOUS" in high[VERDICT] and "NORMAL" in low[VERDICT]
    assert "clearly differs" in high[DETAILS]  # plain-language explanation of the structural branch
    assert high_raw["threshold"] == pytest.approx(5.0) and high_raw["threshold_source"] == "calibrated"


def test_threshold_override(space):
    # the UI sends the override as text ("" = calibrated); API clients may also send numbers or None
    below = assert_ok(predict(space, GOOD, threshold="-1e6"))
    above = assert_ok(predict(space, GOOD, threshold=1e6))
    calibrated = assert_ok(predict(space, GOOD, threshold=" "))
    assert below["verdict"] == "anomalous" and above["verdict"] == "normal"
    assert below["threshold_source"] == "your override" and below["threshold"] == -1e6
    assert calibrated["threshold_source"] == "calibrated" and calibrated["threshold"] == pytest.approx(5.0)
    assert_error(predict(space, GOOD, threshold="high"), "threshold must be a number")


def test_fewer_masks_than_the_top_three(space):
    result = predict(space, GOOD, num_masks=2)
    raw = assert_ok(result)
    assert raw["num_masks"] == 2 and len(raw["top_masks"]) == 2
    views, charts = result[4:7], result[7:10]
    assert all(views[:2]) and all(charts[:2]) and views[2] is None and charts[2] is None


def test_bad_inputs_give_readable_messages_and_the_app_keeps_serving(space, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    assert_error(predict(space, text), "notes.png", "not an image")

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert_error(predict(space, empty), "empty")

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(GOOD.read_bytes()[:2000])
    assert_error(predict(space, truncated), "truncated.png")

    bomb = tmp_path / "bomb.png"  # a valid PNG header claiming 40000 x 40000 pixels: never decoded
    bomb.write_bytes(_png_with_size(40_000, 40_000))
    assert_error(predict(space, bomb), "megapixels")

    assert_error(predict(space, None), "upload an image")
    assert_error(predict(space, GOOD, category="no_such_category"), "category")
    assert_error(predict(space, GOOD, num_masks=500), "between 1 and 50")
    assert_error(predict(space, GOOD, seed=-3), "seed")

    assert_ok(predict(space, GOOD))  # still serving


def test_request_limits_are_enforced_with_readable_messages(space, tmp_path, monkeypatch):
    """Seed, number of masks and image size are bounded per request (spaces_app/README.md lists them);
    the limits themselves are accepted."""
    app = space["app"]
    # 10**30 once broke the JSON output instead of being refused
    assert_error(predict(space, GOOD, seed=10**30), "seed", f"between 0 and {app.MAX_SEED}")
    assert_error(predict(space, GOOD, seed=app.MAX_SEED + 1), "seed", str(app.MAX_SEED))
    assert_error(predict(space, GOOD, seed=2.5), "whole number")
    assert assert_ok(predict(space, GOOD, seed=app.MAX_SEED))["seed"] == app.MAX_SEED
    assert_error(predict(space, GOOD, num_masks=app.MAX_MASKS + 1), "number of masks", f"between 1 and {app.MAX_MASKS}")
    assert assert_ok(predict(space, GOOD, num_masks=app.MAX_MASKS))["num_masks"] == app.MAX_MASKS

    # Header-only PNGs: the size is refused from the header, before any pixel is decoded (a real
    # 1 x 99,000,000 PNG of 384 KB used to cost the Space over 3 GB and 8 s).
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    strip = tmp_path / "strip.png"
    strip.write_bytes(_png_with_size(1, 99_000_000))
    started = time.perf_counter()
    assert_error(predict(space, strip), "strip.png", "1x99000000",
                 f"more than the {app.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels")
    assert time.perf_counter() - started < 5.0
    thin = tmp_path / "thin.png"  # under the pixel limit, but a strip
    thin.write_bytes(_png_with_size(30_000_000, 1))
    assert_error(predict(space, thin), "thin.png", f"more than {app.MAX_ASPECT_RATIO} times its short side")
    over = tmp_path / "over.png"
    side = int(app.MAX_IMAGE_PIXELS**0.5) + 1
    over.write_bytes(_png_with_size(side, side))
    assert_error(predict(space, over), "over.png", "megapixels")
    assert decoded == []

    monkeypatch.undo()
    wide = tmp_path / "wide.png"  # the limits themselves are fine
    Image.new("RGB", (app.MAX_ASPECT_RATIO * 10, 10), "gray").save(wide)
    assert_ok(predict(space, wide))


def test_unusual_image_modes_are_handled(space, tmp_path):
    from ladmim_hf import load_image

    ramp = (np.linspace(0, 40_000, 64 * 80).reshape(64, 80)).astype(np.uint16)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(ramp).save(sixteen)
    with Image.open(sixteen) as check:
        assert check.mode.startswith("I")  # really a 16-bit PNG
    rgba = tmp_path / "rgba.png"
    with Image.open(GOOD) as good:
        layer = good.convert("RGBA")
    layer.putalpha(Image.linear_gradient("L").resize(layer.size))
    layer.save(rgba)
    gray = tmp_path / "gray.jpg"
    with Image.open(GOOD) as good:
        good.convert("L").save(gray, quality=90)
    big = tmp_path / "big.jpg"  # downsized by the app before scoring
    with Image.open(GOOD) as good:
        good.resize((2400, 1800)).save(big, quality=85)

    for path in (sixteen, rgba, gray):
        raw = assert_ok(predict(space, path))
        # the same conversion as the model's own image processor (ladmim_hf.load_image)
        expected = raw_scores(space["model"], space["processor"], path)
        assert raw["pred_score"] == pytest.approx(expected["pred_score"], rel=1e-4, abs=1e-4), path
    big_result = predict(space, big)
    assert_ok(big_result)
    with Image.open(big_result[LOGICAL_MAP]) as heat:
        assert max(heat.size) <= 512  # overlays are drawn at display size
    assert load_image(big).size == (2400, 1800)


def test_parallel_requests_keep_their_own_results(space):
    """4 requests at once from 4 clients (the queue runs 2 concurrently) give each its own result,
    identical to the same request made alone."""
    seeds = [0, 1, 2, 3]
    sequential = [assert_ok(predict(space, LOGICAL, seed=seed)) for seed in seeds]

    def run(seed):
        client = gradio_client.Client(space["url"], verbose=False, download_files=False, analytics_enabled=False)
        return client.predict(gradio_client.handle_file(str(LOGICAL)), CATEGORY, NUM_MASKS, None, seed,
                              api_name="/predict")

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        parallel = [assert_ok(result) for result in pool.map(run, seeds)]
    for seed, alone, together in zip(seeds, sequential, parallel):
        assert together["seed"] == seed
        assert _same(together, alone), (seed, alone, together)
    # the seeds really give different masks, so mixed-up results would be noticed
    assert len({round(r["logical_score"], 6) for r in sequential}) > 1


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        if isinstance(a[key], float):
            if a[key] != pytest.approx(b[key], rel=1e-6, abs=1e-6):
                return False
        elif a[key] != b[key]:
            return False
    return True


def test_model_source_resolution(space, monkeypatch, tmp_path):
    app = space["app"]
    with pytest.raises(FileNotFoundError, match="make demo"):
        app.resolve_model_source(str(tmp_path / "missing" / "model"))
    assert app.resolve_model_source("org/ladmim-loco") == "org/ladmim-loco"  # a Hub id
    monkeypatch.setenv("LADMIM_MODEL", str(space["model_dir"]))
    assert app.resolve_model_source() == str(space["model_dir"])


CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    sys.modules["ladmim_hf"] = None  # as in a Space: the package is not installed
    spec = importlib.util.spec_from_file_location("space_app", sys.argv[1])
    app = importlib.util.module_from_spec(spec)
    sys.modules["space_app"] = app
    spec.loader.exec_module(app)
    demo = app.build_demo(sys.argv[2])
    predict = next(f.fn for f in demo.fns.values() if f.api_name == "predict")
    outputs = predict(sys.argv[3], "pushpins", 4, None, 0)
    print(json.dumps({"module": sys.modules[demo.ladmim_model.__class__.__module__].__name__, "raw": outputs[-1],
                      "pictures": sum(x is not None for x in outputs[2:-1])}))
    """
)


@pytest.mark.slow
def test_app_runs_without_the_ladmim_hf_package(space, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               PYTHONPATH="", GRADIO_ANALYTICS_ENABLED="False")
    result = subprocess.run([sys.executable, str(script), str(APP_FILE), str(space["model_dir"]), str(GOOD)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert not out["module"].startswith("ladmim_hf"), out  # the Hub's remote code, not the package
    assert out["raw"]["status"] == "ok" and np.isfinite(out["raw"]["pred_score"]), out
    assert out["pictures"] == 8


def _png_with_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims width x height (its pixel data is tiny)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def test_mask_charts_name_the_configured_distance(space):
    """The per-mask score is an L1 only with `histogram_distance="l1"`; the chart title says which."""
    import copy

    app, model, processor = space["app"], space["model"], space["processor"]
    image = Image.open(GOOD).convert("RGB")
    plain = app.score(model, processor, image, CATEGORY, NUM_MASKS, None, 0)
    assert plain.distance_name == "L1"
    kernel_model = copy.deepcopy(model)
    kernel_model.config.histogram_distance = "codebook_mmd"
    result = app.score(kernel_model, processor, image, CATEGORY, NUM_MASKS, None, 0)
    assert result.distance_name == "kernel distance"
    assert not np.allclose(result.mask_scores, plain.mask_scores)


def test_a_model_with_every_branch_shows_each_one(tmp_path):
    """Memory bank and global branch: raw score and z of each in the JSON, a row and a plain-language line each
    in the details, the fused row naming rule and branches, and a memory-bank heat map on the calibrated scale."""
    import copy

    from conftest import BRANCH_STATS, fitted_branch_model

    from ladmim_hf import LadmimImageProcessor, load_image

    model, processor = fitted_branch_model(num_masks=NUM_MASKS), LadmimImageProcessor(size=64)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    app = load_app_module()
    demo = app.build_demo(str(tmp_path / "model"))
    predict_fn = next(f.fn for f in demo.fns.values() if f.api_name == "predict")
    outputs = predict_fn(str(GOOD), CATEGORY, NUM_MASKS, None, 0)
    raw, details = outputs[-1], outputs[DETAILS]
    assert raw["status"] == "ok", raw
    # verdict, details, 3 heat maps (logical, structural, memory bank), 3 mask views, 3 charts, JSON
    assert len(outputs) == 12 and all(isinstance(item, Image.Image) for item in outputs[2:-1])

    with torch.no_grad():
        expected = model(**processor(load_image(GOOD)), category=CATEGORY, num_masks=NUM_MASKS, seed=[0])
    branches = ["logical", "structural", "memory_bank", "global"]
    assert list(expected.branch_scores()) == branches
    for branch, value in expected.branch_scores().items():
        assert raw[f"{branch}_score"] == pytest.approx(float(value[0]), rel=1e-5), branch
        z = (float(value[0]) - BRANCH_STATS[f"{branch}_mean"]) / BRANCH_STATS[f"{branch}_std"]
        assert raw[f"z_{branch}"] == pytest.approx(z, rel=1e-4, abs=1e-4), branch
    assert raw["pred_score"] == pytest.approx(float(expected.pred_score[0]), rel=1e-5)
    assert raw["pred_score"] == pytest.approx(max(raw[f"z_{b}"] for b in branches), rel=1e-4)
    assert (raw["fusion_rule"], raw["fused_branches"]) == ("max", branches)

    for title in ("| Logical branch |", "| Structural branch |", "| Memory bank |", "| Global branch |"):
        assert title in details, title
    assert "**Fused** (max of z logical, z structural, z memory bank, z global)" in details
    assert "z logical + z structural" not in details
    assert "patch of the normal training images" in details and "overall feature statistics" in details

    # The memory-bank map is coloured from its calibration mean (blue) to mean + Z_RED std (red).
    view = app._display(app.read_upload(str(GOOD)))
    mean, std = BRANCH_STATS["memory_bank_mean"], BRANCH_STATS["memory_bank_std"]
    reference = app.heatmap_overlay(view, expected.memory_bank_map[0].numpy(), alpha=0.5, vmin=mean,
                                    vmax=mean + app.Z_RED * std)
    np.testing.assert_allclose(np.asarray(outputs[4], dtype=float), np.asarray(reference, dtype=float), atol=2)

    with pytest.warns(UserWarning, match="upload an image"):  # gr.Warning outside a request
        failed = predict_fn(None, CATEGORY, NUM_MASKS, None, 0)
    assert failed[-1]["status"] == "error" and len(failed) == 12 and all(x is None for x in failed[2:-1])

    # A branch left out of the fusion and of the calibration: shown, but without a z.
    partial = copy.deepcopy(demo.ladmim_model)
    partial.config.fused_branches, partial.config.fusion_rule = ["logical", "structural"], "sum"
    partial.config.calibration = {CATEGORY: {k: v for k, v in BRANCH_STATS.items()
                                             if not k.startswith(("memory_bank", "global"))}}
    result = app.score(partial, processor, Image.open(GOOD).convert("RGB"), CATEGORY, NUM_MASKS, None, 0)
    assert result.branch_z["memory_bank"] is None and result.branch_z["global"] is None
    text = app.details_markdown(result)
    assert "| Memory bank (not fused) |" in text and "no statistics" in text
    assert "**Fused** (sum of z logical, z structural)" in text
    assert app.render(result, view)[2] is not None and app.summary(result, [])["z_global"] is None


def test_intro_names_the_fusion_rule_in_words_and_what_the_global_branch_looks_at():
    app = load_app_module()
    branches = ["logical", "structural", "memory_bank", "global"]
    text = app.intro(branches, ["logical", "memory_bank", "global"], "max_mean", "part_histogram")
    assert "The verdict uses the largest plus the mean of the standardised logical, memory bank and global scores." in text
    assert "counts how much of the image looks like each kind of part" in text and "max_mean" not in text
    moments = app.intro(branches, ["logical", "memory_bank"], "sum")
    assert "overall feature statistics" in moments and "the sum of the standardised logical and memory bank" in moments
    assert "the largest of the standardised" in app.intro(branches, ["logical", "global"], "max")
    assert "memory bank" not in app.intro(["logical", "structural"], ["logical", "structural"], "sum")


def test_mask_outlines_follow_the_pose_the_logical_branch_scored_at():
    """With `logical_pose_step`, the masks hid cells of the moved image: the outlines are moved back by the
    chosen pose (the same pose the model reports in `logical_pose_scores`), and the details say so."""
    from types import SimpleNamespace

    from ladmim_hf import LadmimForAnomalyDetection, LadmimImageProcessor

    app = load_app_module()
    drawing = sys.modules["drawing"]

    # mask_outline by hand: a 4 x 4 grid on a 40 x 40 image, cell (row 1, column 1) hidden, moved 3 left, 2 down
    image = Image.new("RGB", (40, 40), (200, 200, 200))
    cells = np.zeros((4, 4), dtype=bool)
    cells[1, 1] = True
    plain = np.asarray(drawing.mask_outline(image, cells, 4))
    moved = np.asarray(drawing.mask_outline(image, cells, 4, offset=(-3, 2)))
    assert tuple(plain[15, 15]) == (200, 200, 200) and tuple(moved[17, 12]) == (200, 200, 200)  # inside the region
    assert moved[11, 18, 0] == int(200 * 0.45)  # inside the unmoved region only: dimmed
    assert tuple(moved[17, 7]) == drawing.OUTLINE_COLOR and tuple(plain[15, 10]) == drawing.OUTLINE_COLOR  # left edges

    step = 4
    config = SimpleNamespace(logical_pose_moves=[(step, 0), (-step, 0), (0, step), (0, -step)])
    out = SimpleNamespace(logical_pose_scores=torch.tensor([[3.0, 5.0, 1.0, 2.0, 4.0]]))
    assert app.best_pose_move(out, config) == (-step, 0)
    assert app.best_pose_move(SimpleNamespace(logical_pose_scores=None), config) == (0, 0)
    assert app.pose_text((-step, 0)) == f"{step} px left" and app.pose_text((0, step)) == f"{step} px down"

    torch.manual_seed(0)
    model = LadmimForAnomalyDetection(tiny_config(num_masks=NUM_MASKS, logical_pose_step=step)).eval()
    processor = LadmimImageProcessor(size=64)
    picture = Image.open(GOOD).convert("RGB")
    result = app.score(model, processor, picture, CATEGORY, NUM_MASKS, None, 0)
    with torch.no_grad():
        expected = model(**processor(picture), category=CATEGORY, num_masks=NUM_MASKS, seed=[0])
    moves = [(0, 0)] + model.config.logical_pose_moves
    assert result.pose_move == moves[int(expected.logical_pose_scores[0].argmin())]

    result.pose_move = (step, -step)  # whichever pose a random model picks, check one that moves both ways
    view = app._display(picture)
    outlines = app.render(result, view)[3]
    first = int(np.argsort(-result.mask_scores, kind="stable")[0])
    offset = (round(-step * view.width / 64), round(step * view.height / 64))
    reference = drawing.mask_outline(view, result.masks[first], result.grid_size, offset=offset)
    assert np.array_equal(np.asarray(outlines[0]), np.asarray(reference))
    assert f"moved {step} px right and {step} px up" in app.details_markdown(result)
    assert app.summary(result, [])["logical_pose_move"] == [step, -step]


def test_details_name_the_two_logical_components_of_a_retrieving_model():
    from conftest import BRANCH_STATS, fitted_branch_model

    from ladmim_hf import LadmimImageProcessor

    app = load_app_module()
    model = fitted_branch_model(num_masks=NUM_MASKS, global_descriptor="part_histogram", global_parts=8,
                                logical_retrieval_neighbours=2, logical_retrieval_rank=4, logical_retrieval_num_masked=4,
                                logical_retrieval_min_block=2)
    components = dict(logical_predictor_mean=0.5, logical_predictor_std=0.2, logical_retrieval_mean=0.05,
                      logical_retrieval_std=0.01)
    model.config.calibration = {c: {**BRANCH_STATS, **components} for c in model.categories}
    result = app.score(model, LadmimImageProcessor(size=64), Image.open(GOOD).convert("RGB"), CATEGORY, NUM_MASKS, None, 0)
    with torch.no_grad():
        out = model(**LadmimImageProcessor(size=64)(Image.open(GOOD).convert("RGB")), category=CATEGORY,
                    num_masks=NUM_MASKS, seed=[0])
    z_predictor = (float(out.logical_predictor_score[0]) - 0.5) / 0.2
    z_retrieval = (float(out.logical_retrieval_score[0]) - 0.05) / 0.01
    assert result.logical_components_z["logical_predictor"] == pytest.approx(z_predictor, rel=1e-4, abs=1e-4)
    assert result.logical_components_z["logical_retrieval"] == pytest.approx(z_retrieval, rel=1e-4, abs=1e-4)
    text = app.details_markdown(result)
    assert f"the larger of the trained predictor's z ({z_predictor:+.2f}) and the retrieval's z ({z_retrieval:+.2f})" in text
    # the logical map is the predictor's, so it is coloured on the predictor's scale, not the combined z's
    view = app._display(Image.open(GOOD).convert("RGB"))
    low = 0.5
    reference = app.heatmap_overlay(view, result.logical_map, alpha=0.5, vmin=low,
                                    vmax=low + app.Z_RED * 0.2 * NUM_MASKS ** 0.5)
    np.testing.assert_array_equal(np.asarray(app.render(result, view)[0]), np.asarray(reference))
