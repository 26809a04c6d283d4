"""Who may talk to whom, and what strangers can make us do.

Control plane: mutual TLS 1.3 (tls.py) with certificates from the cluster CA
(pki.py) or from a CA derived from the cluster secret (secret.py), bound to node names
by a handshake (auth.py). Data plane: per-boot X25519 key material (keys.py) from which
the Rust side derives its link keys. Untrusted input: bounded JSON (safejson.py) and
escaped, rate-limited logging (logsafe.py).
"""
