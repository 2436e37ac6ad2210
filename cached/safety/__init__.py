"""Image content safety (issue 18): the format inspector as a stream consumer of a fill
(:mod:`.inspect`), the verdict rules (:mod:`.verdict`) and the verdict's xattr
(:mod:`.record`), audit mode (:mod:`.audit`); Glance image signatures: the verifier, its
anchors and xattr (:mod:`.signature`) and their checks as images are cached and hit
(:mod:`.signatures`). Below fills and HTTP: the fill and the proxy call in through the
hooks they are given (``Filler.safety``/``signatures``, ``Proxy.safety``/``signatures``).
"""
