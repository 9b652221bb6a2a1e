"""Where a state-dict key belongs: ``(stack, layer index)`` parsed from a module or tensor name."""

from __future__ import annotations

import re

SiteKey = tuple[str, int]

# The first ``layer.N`` / ``layers.N`` / ``block.N`` (T5: ``encoder.block.3.layer.1`` is block 3,
# its sub-layer 1) in a name is the transformer layer.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:block|layers?)\.(\d+)(?:\.|$)")


def site_key(qualified_name: str) -> SiteKey | None:
    """``(stack, layer index)`` parsed from a module or state-dict key, e.g.
    ``bert.encoder.layer.3.output.adapters.x...`` -> ``("encoder", 3)``,
    ``decoder.block.2.layer.2.adapters.x...`` -> ``("decoder", 2)``; None without a layer index."""
    match = _LAYER_INDEX.search(qualified_name)
    if match is None:
        return None
    stack = "decoder" if re.search(r"(?:^|\.)decoder\.", qualified_name[: match.start() + 1]) else "encoder"
    return stack, int(match.group(1))


def site_tag(key: SiteKey) -> str:
    """``("encoder", 3)`` -> ``"encoder.3"`` (how ScaLearn checkpoints name a site)."""
    return f"{key[0]}.{key[1]}"
