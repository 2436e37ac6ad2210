"""The HTTP edge: sockets, connection limits, TLS, how a request routes, the request policy,
what is relayed and the answers cached makes up.
"""
