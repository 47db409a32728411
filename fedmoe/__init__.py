"""fedmoe's front door: the `fedmoe` command and nothing else; no package imports it.

The architecture is the top-level packages, imports pointing down only (tests/test_layers.py):

    fedmoe/       the CLI: demo, init, run, export, ledger, rights, certs, serve, join, submit, report
    server/       the operator: Flower ServerApp and its round stages, run config, workspace,
                  checkpoints, ledger, usage rights, releases
    client/       a member: Flower ClientApp, the local training recipe, node-local state,
                  its side of secure aggregation
    protos/       the wire both sides speak: the round's messages (TRAIN, HELLO, SecAgg stages, replies)
    aggregation/  pure functions over tensors: codec, per-expert averaging, contribution scoring
    privacy/      secure aggregation (SecAgg+), Shamir sharing, the consortium's certificates
    model/        the MoE language model, LoRA, tokenizer, corpora, precision, safetensors IO
"""

__version__ = "0.1.0"
