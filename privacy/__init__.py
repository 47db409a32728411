"""Privacy: what keeps members' updates and identities to themselves.

secagg.py is the SecAgg+-style protocol (parameters, neighbour graph, ring sizing), with its
wire format (secagg_wire.py), shared primitives (secagg_crypto.py), a member's session
(secagg_member.py) and the server's (secagg_server.py); shamir.py shares secrets for dropout
recovery; certs.py makes the consortium's CA, TLS and node-authentication keys; dp.py is a
member's record-level DP-SGD (per-sample gradients, clipping, noise) and the (ε, δ) budget it
keeps in its state dir, accounted by opacus. Pure protocol code over bytes and tensors, no
Flower; the one file written is dp.py's budget. privacy/ imports only model/ of the project.
"""
