"""The model layer: the MoE language model, LoRA, tokenizer, corpora, precision and safetensors IO.

The bottom of the stack: it imports nothing else of the project and changes nothing global on
import (library chatter is silenced by the entry points, model/chatter.py), with one exception:
peft imports bitsandbytes (a member's quantized base, model/quantize.py), whose CPU backend tries
to fetch an optional kernel from the Hugging Face hub on import and logs a warning when it cannot;
that happens before any entry point runs, so its logger is quieted here.
"""

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
