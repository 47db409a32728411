"""MoE language model, LoRA, tokenizer, corpora and safetensors IO."""

import warnings

from transformers.utils import logging as _hf_logging

# Library chatter (weight-loading bars, deprecation notices) drowns the round progress.
_hf_logging.disable_progress_bar()
_hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
