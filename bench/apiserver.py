"""``python -m bench.apiserver PORT [--dev]``: ``api.create_app`` on the production server
(``api.server.serve_api``: waitress, as ``ocore-storage api`` runs it), or werkzeug's
threaded development server with ``--dev``."""

from __future__ import annotations

import logging
import sys


def main() -> None:
    from api import create_app
    from core.settings import Settings

    port = int(sys.argv[1])
    app = create_app(Settings())  # OCORE_* from the environment the bench sets
    if "--dev" in sys.argv[2:]:
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        make_server("127.0.0.1", port, app, threaded=True).serve_forever()
        return
    from api.server import serve_api

    serve_api(app, f"127.0.0.1:{port}")


if __name__ == "__main__":
    main()
