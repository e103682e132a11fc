"""The categories and their defect types (LOCO's ``defects_config.json`` fields)."""

from __future__ import annotations

from .geometry import SCENE_SIZE

CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")

# Defect types: name, kind, grey value of the mask, sPRO saturation (absolute areas are given in
# pixels of a 256 x 256 image and scaled with the image size when written).
_DEFECTS: dict[str, list[tuple[str, str, int, float, bool]]] = {
    "breakfast_box": [
        ("missing_fruit", "logical", 255, 1000, False),
        ("extra_fruit", "logical", 254, 1.0, True),
        ("wrong_fruit_kind", "logical", 253, 1.0, True),
        ("wrong_ratio", "logical", 252, 1500, False),
        ("missing_ingredient", "logical", 251, 3000, False),
        ("damaged_fruit", "structural", 245, 1.0, True),
        ("contamination", "structural", 244, 1.0, True),
        ("box_damage", "structural", 243, 1.0, True),
    ],
    "juice_bottle": [
        ("wrong_fruit_icon", "logical", 255, 800, False),
        ("wrong_fill_level", "logical", 254, 1500, False),
        ("missing_label", "logical", 253, 2500, False),
        ("misplaced_label", "logical", 252, 1.0, True),
        ("missing_bottom_label", "logical", 251, 800, False),
        ("contamination", "structural", 245, 1.0, True),
        ("damaged_label", "structural", 244, 1.0, True),
        ("scratch", "structural", 243, 1.0, True),
        ("damaged_cap", "structural", 242, 1.0, True),
    ],
    "pushpins": [
        ("missing_pushpin", "logical", 255, 1200, False),
        ("additional_pushpin", "logical", 254, 1.0, True),
        ("missing_separator", "logical", 253, 1.0, True),
        ("broken_pushpin", "structural", 245, 1.0, True),
        ("color", "structural", 244, 1.0, True),
        ("contamination", "structural", 243, 1.0, True),
    ],
    "screw_bag": [
        ("missing_part", "logical", 255, 600, False),
        ("additional_part", "logical", 254, 1.0, True),
        ("wrong_screw_length", "logical", 253, 1.0, True),
        ("broken_screw", "structural", 245, 1.0, True),
        ("bag_broken", "structural", 244, 1.0, True),
        ("color", "structural", 243, 1.0, True),
        ("contamination", "structural", 242, 1.0, True),
    ],
    "splicing_connectors": [
        ("wrong_cable_color", "logical", 255, 1500, False),
        ("unequal_slot_count", "logical", 254, 1.0, True),
        ("missing_cable", "logical", 253, 1500, False),
        ("wrong_cable_slot", "logical", 252, 1.0, True),
        ("extra_cable", "logical", 251, 1.0, True),
        ("broken_cable", "structural", 245, 1.0, True),
        ("broken_connector", "structural", 244, 1.0, True),
        ("color", "structural", 243, 1.0, True),
        ("contamination", "structural", 242, 1.0, True),
    ],
}


def defect_types(category: str, kind: str | None = None) -> list[str]:
    """Names of a category's defect types, optionally only ``"logical"`` or ``"structural"`` ones."""
    check_category(category)
    return [name for name, k, *_ in _DEFECTS[category] if kind is None or k == kind]


def defects_config(category: str, image_size: int = 256) -> list[dict]:
    """The ``defects_config.json`` content of a category (LOCO's field names)."""
    check_category(category)
    area_scale = (image_size / SCENE_SIZE) ** 2
    out = []
    for name, _, value, saturation, relative in _DEFECTS[category]:
        threshold = float(saturation) if relative else int(round(saturation * area_scale))
        out.append({"defect_name": name, "pixel_value": value, "saturation_threshold": threshold,
                    "relative_saturation": relative})
    return out


def pixel_value(category: str, name: str) -> int:
    for defect, _, value, *_ in _DEFECTS[category]:
        if defect == name:
            return value
    raise KeyError(f"unknown defect type {name!r} for category {category!r}")


def check_category(category: str) -> None:
    if category not in _DEFECTS:
        raise ValueError(f"unknown synthloco category {category!r}; choose from {', '.join(CATEGORIES)}")

