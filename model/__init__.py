"""The model layer: the MoE language model, LoRA, tokenizer, corpora, precision and safetensors IO.

The bottom of the stack: it imports nothing else of the project and changes nothing global on
import (library chatter is silenced by the entry points, model/chatter.py), with one exception:
peft imports bitsandbytes (a member's quantized base, model/quantize.py), whose CPU backend tries
to fetch an optional kernel from the Hugging Face hub on import and logs a warning when it cannot;
that happens before any entry point runs, so its logger is quieted here, and so is the
DeprecationWarning about `torch.jit.script_method` that torch's own modules raise when
bitsandbytes' import pulls in torch.compile (Flower's simulation actors print it).
"""

import logging
import warnings

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)
