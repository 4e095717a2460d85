"""Runs the localstripe emulator on 127.0.0.1 with its pickle file turned off.

localstripe binds every interface and saves its store to /tmp/localstripe.pickle
after each change; the tests want neither. Usage: python localstripe_server.py PORT
"""

from __future__ import annotations

import sys

from aiohttp import web
from localstripe import resources, server


def main() -> None:
    port = int(sys.argv[1])
    resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]
    resources.Store.try_load_from_disk = lambda self: None  # type: ignore[method-assign]
    web.run_app(server.app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
