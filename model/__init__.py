"""The model layer: the MoE language model, LoRA, tokenizer, corpora, precision and safetensors IO.

The bottom of the stack: it imports nothing else of the project and changes nothing global
on import (library chatter is silenced by the entry points, model/chatter.py).
"""
