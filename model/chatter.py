"""Library chatter (weight-loading bars, deprecation notices) silenced at a process's edge.

Importing model/ changes nothing global; the entry points that own a process — the `fedmoe`
CLI and the Flower ServerApp and ClientApp modules that a SuperLink, a SuperNode or the
simulation engine load — call `silence_library_chatter()` so round progress stays readable.
"""

from __future__ import annotations

import os
import sys
import warnings


def silence_library_chatter() -> None:
    """Hide Hugging Face progress bars and info logs, and FutureWarnings, for this process.

    transformers not imported yet: through the environment it reads when it is (so a ClientApp
    process that answers a secure-aggregation stage never pays for importing it)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "transformers" not in sys.modules:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
