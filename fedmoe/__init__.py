"""fedmoe's front door: the `fedmoe` CLI, run config, workspace layout and the round's messages.

The architecture is the top-level packages: model/ (MoE + LoRA + data), client/ (member),
server/ (operator), aggregation/ (averaging, codec, contribution), privacy/ (secure aggregation, DP).
"""

__version__ = "0.1.0"
