"""Peak memory of one `ladmim predict` call as the number of masks grows.

Runs `ladmim predict IMAGE --model MODEL --num_masks M` in a fresh process for every M and reads its
peak resident memory (the child reports its own `ru_maxrss`). With
the predictor's memory budget (`config.scoring_memory_mb`), memory should not follow M.

    python benchmarks/predict_memory.py --model outputs/synthloco/model --category pushpins \
        --image data/synthloco/pushpins/test/good/000.png --masks 10 4000
    python benchmarks/predict_memory.py --tiny      # a tiny random model, seconds, for the tests

Last stdout line: JSON with `peak_rss_mb` per number of masks and `growth_mb` (largest - smallest).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C

CHILD = """
import resource, sys
from ladmim_hf.cli import main
code = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def tiny_model_folder(folder: Path) -> tuple[Path, Path]:
    """A tiny random detector and one image, for `--tiny`."""
    import numpy as np
    from PIL import Image

    from ladmim_hf import LadmimImageProcessor

    model = C.build_detector(C.tiny_config())
    model.save_pretrained(folder / "model")
    LadmimImageProcessor(size=model.config.tokenizer_config.image_size).save_pretrained(folder / "model")
    image = folder / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    return folder / "model", image


def main(argv=None) -> dict:
    parser = C.base_parser(__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--image", default=None)
    parser.add_argument("--category", default=C.CATEGORY)
    parser.add_argument("--masks", type=int, nargs="+", default=[10, 4000])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        if args.tiny:
            model, image = tiny_model_folder(Path(work))
            args.masks = [2, 200]
        elif not (args.model and args.image):
            raise SystemExit("pass --model and --image (or --tiny)")
        else:
            model, image = Path(args.model), Path(args.image)
        peaks = {}
        for masks in args.masks:
            command = [sys.executable, "-c", CHILD, "predict", str(image), "--model", str(model), "--category",
                       args.category, "--num_masks", str(masks), "--output_dir", str(Path(work) / "out")]
            result = subprocess.run(command, capture_output=True, text=True, cwd=C.ROOT)
            if result.returncode != 0:
                raise SystemExit(f"ladmim predict failed with --num_masks {masks}:\n{result.stderr[-2000:]}")
            peak_kb = int(result.stdout.split("PEAK_RSS_KB")[-1].split()[0])
            peaks[str(masks)] = round(peak_kb / 1024, 1)
            C.log(f"{masks} masks: {peaks[str(masks)]} MB")
    result = {"peak_rss_mb": peaks, "growth_mb": round(max(peaks.values()) - min(peaks.values()), 1),
              "model": "tiny" if args.tiny else str(args.model)}
    C.emit("peak RSS of ladmim predict per --num_masks: " + json.dumps(peaks), result)
    return result


if __name__ == "__main__":
    main()
