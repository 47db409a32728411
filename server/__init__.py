"""The operator: the Flower ServerApp, the round loop as named stages, and what the operator keeps.

A round (server/rounds.py) reads top to bottom: sample members (sampling.py), broadcast the
trainable state as TRAIN, validate each reply where it arrives (validate.py), the four
secure-aggregation exchanges (secure.py), score contributions on held-out loss (scoring.py,
evaluation.py), aggregate per expert, commit the round atomically (checkpoint.py) and append it
to the signed Merkle ledger (ledger/). Around it: the run config (config.py) and workspace layout
(workspace.py), Prometheus metrics, usage rights from the ledger (rights.py), releases that
transformers and peft load (release.py), and the operator's `init` of the demo base.
server/ imports protos/, aggregation/, privacy/ and model/; never client/ or fedmoe/.
"""
