"""Image content safety (issue 18): the format inspector as a stream consumer of a fill
(:mod:`.inspect`), the verdict rules (:mod:`.verdict`) and the verdict's xattr
(:mod:`.record`). A leaf beside ``store/``: nothing here knows fills, HTTP or the loop."""
