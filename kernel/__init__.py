"""What every DCU package imports: settings, the error tree and diagnostics.

The kernel imports no other DCU package, so the domain (``events``), the edges (``bus``,
``persistence``, ``actors``, ``gateway``) and the composition root (``dcu``) can all stand
on it without an import running back up.
"""
