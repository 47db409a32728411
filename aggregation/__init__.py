"""Aggregation: pure functions over tensors for what the operator does with members' updates.

The update codec: codec.py (encode/decode, the public front) over its container format
(container.py, codec_config.py, byteview.py) and encodings (quantize.py, sparsify.py), with the
member's error feedback (feedback.py). fedavg.py averages per expert, weighted by routed tokens;
broadcast.py makes the server's int8 view patches; secure.py lays updates out for secure
aggregation and decodes the sum. Contribution scoring: Shapley estimation (shapley.py), the
secure mode's groups (groups.py) and member values across rounds (group_estimator.py), shares and
the score book (contribution.py), free-rider detectors (free_riders.py).
No I/O, no Flower; imports only privacy/ (ring sizing) and model/ of the project.
"""
