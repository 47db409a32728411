"""A member: the Flower ClientApp, the local training recipe, node-local state.

app.py translates Flower messages to plain objects (protos/) and delegates: node.py loads the
base (checked by sha256), the member's private data and its state dir, applies the broadcast
view, trains with trainer.py (a plain loop under autocast; fp16 + GradScaler or bf16 from
model/precision.py), encodes the delta with the codec and its error-feedback residual, and
replies; secure.py holds the member's side of secure aggregation (its masked input, the four
stages). client/ imports protos/, aggregation/, privacy/ and model/; never server/ or fedmoe/.
"""
