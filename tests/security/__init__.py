"""Attack tests (issue 8): cross-cutting attack classes, against the live API.

The rule between this layer and ``tests/api`` (issue #18 item 6: each assertion once, in
the layer that mirrors the code):

* ``tests/api`` mirrors the ``api`` package, one module per area: a route's contract
  (status, error code, body, headers) and what one module does with one input (the auth
  module with one token, mint_token, path validation of one name, symlinks), in process
  through Flask's test client.
* ``tests/security`` holds the attack classes that cut across every route: the bad-token
  matrix (every route x every forged, expired or malformed token x the HS256, RS256 and
  mixed setups), other organizations' ids on every route, traversal payloads in every
  path parameter, schemathesis with every check, uploads, slow clients, bursts, error
  disclosure. They go over real HTTP to a live server whose storage sits behind the
  counting fault proxy, and each proves the attack is refused *and* caused nothing: no
  storage request, no Celery message, no job, no file changed.

A matrix of "every route x every attack" lives here only; tests/api keeps the cases that
are about one module's behaviour (see the docstrings of test_api_auth.py and
test_api_isolation.py for what moved here).
"""
