"""Work units: (part x variant x layer [x cache bucket]).

A unit is what gets emitted, quantized, cached and resumed on its own; its name is its file name.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTS = ("EMBED", "MASK", "PRE", "CACHE", "POST", "HEAD")
# A vision-language model's image encoder (graph/vision.py): the patch embedding, the encoder's
# layers (part "VISION" in the precision plan, as in the compile manual) and the projector. They
# make one program of their own, the "vision" variant, run once per image.
VISION_PARTS = ("VISION_EMBED", "VISION", "PROJECTOR")


@dataclass(frozen=True, order=True)
class Unit:
    is_group: bool
    part: str
    index: int = -1  # layer index for PRE / CACHE / POST
    bucket: int = 0  # KV positions for MASK / CACHE

    @property
    def variant(self) -> str:
        if self.part in VISION_PARTS:
            return "vision"
        return "group" if self.is_group else "single"

    @property
    def name(self) -> str:
        if self.part == "VISION_EMBED":
            return "vision/embed"
        if self.part == "PROJECTOR":
            return "vision/projector"
        if self.part == "VISION":
            return f"vision/layer{self.index:03d}"
        if self.part in ("EMBED", "HEAD"):
            return f"{self.variant}/{self.part.lower()}"
        if self.part == "MASK":
            return f"{self.variant}/mask_kv{self.bucket:05d}"
        if self.part == "CACHE":
            return f"{self.variant}/layer{self.index:03d}_cache_kv{self.bucket:05d}"
        return f"{self.variant}/layer{self.index:03d}_{self.part.lower()}"

    @property
    def weight_scope(self) -> str:
        """Weights are named by scope, not variant: the group and single units of a layer at the
        same precision then hold identical initializers, which linking stores once."""
        if self.part == "VISION":
            return f"vision{self.index:03d}"
        return f"layer{self.index:03d}" if self.index >= 0 else self.part.lower()


def plan_units(num_layers: int, buckets: list[int], vision_layers: int | None = None) -> list[Unit]:
    """vision_layers: the image encoder's layers, for a vision-language model."""
    units = []
    if vision_layers is not None:
        units.append(Unit(True, "VISION_EMBED"))
        units += [Unit(True, "VISION", i) for i in range(vision_layers)]
        units.append(Unit(True, "PROJECTOR"))
    for is_group in (True, False):
        units.append(Unit(is_group, "EMBED"))
        units += [Unit(is_group, "MASK", bucket=b) for b in buckets]
        for i in range(num_layers):
            units.append(Unit(is_group, "PRE", i))
            units += [Unit(is_group, "CACHE", i, bucket=b) for b in buckets]
            units.append(Unit(is_group, "POST", i))
        units.append(Unit(is_group, "HEAD"))
    return units
