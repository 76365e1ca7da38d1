"""The three phases of an Ettin run and every name each one goes by.

    name        the recipe's `phase`, RunMetadata's and config.json's `ettin_phase`: pretrain, extension, decay
    short       the published batch order's phase and the exporter's --phase: pretrain, ext, decay
    tag         the revision tag prefix of its checkpoints: step{N}, ext{N}, decay{N}
    order_dir   the published order's folder prefix: checkpoint_*, ext_*, decay_*
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    short: str
    tag: str
    order_dir: str

    def tag_of(self, step: int) -> str:
        """The revision tag of this phase's checkpoint at batch `step` (each phase's clock starts at 0)."""
        return f"{self.tag}{step}"


PHASES = (Phase("pretrain", "pretrain", "step", "checkpoint"),
          Phase("extension", "ext", "ext", "ext"),
          Phase("decay", "decay", "decay", "decay"))
NAMES = tuple(p.name for p in PHASES)
SHORT_NAMES = tuple(p.short for p in PHASES)


def phase(name: str) -> Phase:
    """The phase called `name` in any of its spellings (pretrain, extension or ext, decay)."""
    for p in PHASES:
        if name in (p.name, p.short):
            return p
    raise ValueError(f"unknown phase {name!r}; expected one of {', '.join(NAMES)} (or {', '.join(SHORT_NAMES)})")
