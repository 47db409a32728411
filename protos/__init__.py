"""The wire: every message the operator and the members exchange, typed and versioned.

`protos/messages.py` holds the round's messages (TRAIN, HELLO, the secure-aggregation stages
and the replies) as frozen dataclasses with their Flower `RecordDict` form and strict parsing;
the model hub's `hub.proto` and its generated stubs belong here beside them. server/ and client/ both
import protos/; protos/ imports nothing of the project.
"""
