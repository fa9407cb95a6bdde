"""What the trainer writes for the Depth dashboard and how the plugin reads it back.

One tensor summary per quantity and evaluation, `SummaryMetadata.plugin_data.plugin_name = "depth"`,
data class TENSOR (so neither *Scalars* nor *Time Series* shows it):

    tag      <prefix>/<quantity>    prefix `depth` (raw weights) or `depth_<model>` (`depth_ema`)
    value    float64 [num_stages]   aligned with `stages`, NaN where undefined (as null in diagnostics.jsonl)
    content  JSON                   {"version": 1, "kind": "stages", "model": "raw", "metric": "isi",
                                     "key": "isi", "quantity": "isi", "family": "isi", "log": false,
                                     "stages": ["embed", "pe", "block_1", ..., "norm"]}

plus one `<prefix>/phases` tensor per evaluation with the detected phases:

    value    float64 [len(PHASE_FIELDS)]  boundaries as stage indices (0 = embed), NaN when absent
    content  {"version": 1, "kind": "phases", "model": "raw", "fields": [...], "stages": [...]}

Quantities, families and log scales come from diagnostics/registry.py when the trainer writes them;
the plugin only reads what the content says. This module is imported by the writer
(diagnostics/tensorboard_logging.py) and by the plugin; it needs only TensorBoard's protos.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

PLUGIN_NAME = "depth"
CONTENT_VERSION = 1
PHASE_BOUNDARY_FIELDS = ("cliff_end", "plateau_start", "plateau_end", "climb_start")  # stage indices
PHASE_FIELDS = (*PHASE_BOUNDARY_FIELDS, "cliff_size", "tau", "plateau_length", "plateau_median")
PHASES_QUANTITY = "phases"

# A phase "is there" at an evaluation when: the Cliff drops by more than the tolerance tau; the Plateau
# spans at least PLATEAU_MIN_STAGES stages (a stretch, not a single flat point); a Climb was detected.
PLATEAU_MIN_STAGES = 3

# P1's regimes of the Information Scrambling Index (science.md §2): ISI below the controlled-consensus
# band of ViT-B (about 0.004-0.009) is communication collapse, above it chaotic diffusion.
ISI_REGIMES = (
    {"name": "communication collapse", "low": None, "high": 0.004},
    {"name": "controlled consensus", "low": 0.004, "high": 0.009},
    {"name": "chaotic diffusion", "low": 0.009, "high": None},
)
ISI_QUANTITY = "isi"


def tag_prefix(model: str) -> str:
    """`depth` for the raw weights, `depth_<model>` otherwise (the prefix of every depth tag)."""
    return PLUGIN_NAME if model == "raw" else f"{PLUGIN_NAME}_{model}"


def summary_metadata(content: Mapping[str, Any]) -> Any:
    """A SummaryMetadata for the Depth plugin carrying `content` as JSON."""
    from tensorboard.compat.proto import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = PLUGIN_NAME
    metadata.plugin_data.content = json.dumps({"version": CONTENT_VERSION, **content}).encode()
    metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
    return metadata


def tensor_value(tag: str, values: Sequence[float | None], content: Mapping[str, Any]) -> Any:
    """One `Summary.Value`: a float64 vector (None -> NaN) with the plugin's metadata."""
    import numpy as np
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.util import tensor_util

    array = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    return summary_pb2.Summary.Value(tag=tag, metadata=summary_metadata(content),
                                     tensor=tensor_util.make_tensor_proto(array))


def parse_content(raw: bytes) -> dict[str, Any] | None:
    """The JSON content of a depth time series, or None for a version this plugin cannot read."""
    try:
        content = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(content, dict) or content.get("version") != CONTENT_VERSION:
        return None
    return content
