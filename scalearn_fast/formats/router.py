"""Router checkpoints: the file format of a ``save_router`` folder, with no model in sight.

A folder holds ``router.safetensors`` (each site's router as ``router.{stack}.{index}.weight``
[N, d] and ``.bias`` [N]; the task head as ``head.{name}``; with ``sources_included`` the frozen
sources as ``source.{i}.{stack}.{index}.{w_down|b_down|w_up|b_up}``, as in ScaLearn
checkpoints) and ``router_config.json``. As for ScaLearn checkpoints (the reading and writing is
``scalearn_fast.formats.unit``'s), the weights file's header holds the config too (one atomic
replace publishes both), and a folder whose JSON copy differs from it is refused.
"""

from __future__ import annotations

from typing import Any

from .unit import Fail, UnitFormat, is_int

_GATES = ("softmax", "sigmoid", "topk")
_GRANULARITIES = ("token", "sequence")
_MODES = ("output", "merge")


def _check_k(config: dict[str, Any], fail: Fail) -> None:
    n, k = config["num_sources"], config.get("k")
    if (config["gate"] == "topk") != (k is not None) or (k is not None and not (is_int(k) and 1 <= k <= n)):
        raise fail(f"k is {k!r} for gate {config['gate']!r} and N={n} (topk needs 1 <= k <= N, others null)")


_FORMAT = UnitFormat(
    "router",
    format="scalearn_fast_router",
    version=1,
    choices={"gate": _GATES, "granularity": _GRANULARITIES, "mode": _MODES},
    check_kind=_check_k,
)

# What a ``save_router`` folder is read and written with (``UnitFormat``'s methods, documented there).
check_router_config = _FORMAT.check
write_router_checkpoint = _FORMAT.write
read_router_checkpoint = _FORMAT.read
