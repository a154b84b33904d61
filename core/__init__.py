"""The base floor: what every other package may use and what uses nothing of theirs.

Typed settings (:mod:`core.settings`), logging with its job context and secret redaction
(:mod:`core.logging`), and the shutdown signal (:mod:`core.shutdown`). Nothing here
imports ``db``, ``storage_backends``, ``tasks``, ``api`` or ``worker`` (an import-linter
contract in ``make lint`` says so).
"""
