"""``synthloco``: a generated logical-anomaly benchmark in the MVTec LOCO AD folder layout.

Five categories modelled on LOCO's rules (``breakfast_box``, ``juice_bottle``, ``pushpins``,
``screw_bag``, ``splicing_connectors``). Each image is first sampled as a *scene description*
(plain JSON data: objects, their kinds, positions and colours), the anomaly is applied to that
description, a rule checker confirms that exactly the intended rule is broken (logical) or that no
rule is broken (good, structural), and only then the scene is rendered. The description is the
source of truth: ``render_scene(scene)`` re-creates the image, ``check_scene_rules(scene)`` lists
the broken rules, and every category writes ``scenes.json`` next to its images.

Normal images vary as photographs do (scene jitter and rotation, lighting gradients and
vignetting, white balance, sensor noise, CC0 textures from scikit-image) and, more importantly,
the *normal* variation is designed so that logical anomalies create no locally new patch: items
lie anywhere inside their compartments, so an empty spot or two close items occur in normal
images too; counts are global; colour pairings couple distant parts. Structural anomalies are
local (stains, cuts, scratches, bends, wrong colours).

Modules, from the bottom up:

- ``geometry``: shape specs (JSON-able dicts) with signed distances and bounding boxes.
- ``textures``, ``canvas``: the renderer (shapes filled with colour functions, photo finish).
- ``sampling``: random placement and shape helpers, photo parameters.
- ``breakfast_box``, ``juice_bottle``, ``pushpins``, ``screw_bag``, ``splicing_connectors``: one
  module per category (sample, defects, rules, render).
- ``defects``: the categories' defect types; ``scene``: make, check and render a scene.
- ``writer``: the benchmark on disk; ``cli``: the command line.

Run ``python -m ladmim_hf.data.synthetic --out data/synthloco --seed 0 [--small]``.
"""

from __future__ import annotations

from .cli import add_synth_arguments, main, run_from_args
from .defects import CATEGORIES, defect_types, defects_config
from .geometry import SCENE_SIZE
from .scene import check_scene_rules, image_seed, make_scene, render_scene
from .writer import DEFAULT_COUNTS, MARKER_FILE, PNG_OPTIONS, SMALL_COUNTS, generate_synthloco

__all__ = [
    "CATEGORIES",
    "DEFAULT_COUNTS",
    "MARKER_FILE",
    "PNG_OPTIONS",
    "SCENE_SIZE",
    "SMALL_COUNTS",
    "add_synth_arguments",
    "check_scene_rules",
    "defect_types",
    "defects_config",
    "generate_synthloco",
    "image_seed",
    "main",
    "make_scene",
    "render_scene",
    "run_from_args",
]
