"""``python -m bench.apiserver PORT``: ``api.create_app`` on werkzeug's threaded server."""

from __future__ import annotations

import logging
import sys

from werkzeug.serving import make_server


def main() -> None:
    from api import create_app
    from worker.settings import Settings

    port = int(sys.argv[1])
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = create_app(Settings())  # OCORE_* from the environment the bench sets
    server = make_server("127.0.0.1", port, app, threaded=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
