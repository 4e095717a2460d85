"""waitress' own answers to requests it cannot parse, in the spec's JSON error body.

A request line, header or ``Content-Length`` that waitress refuses never reaches
the application; waitress answers it itself, in plain text. :class:`JsonErrorTask`
gives that answer the body every other error has, from :func:`app.error_response`,
with waitress' status and reason.

This relies on waitress' task internals (``ErrorTask``, ``request.error``):
the versions it was tested with are pinned in pyproject.toml, and
tests/test_quiet_channel.py fails when the installed waitress differs.
"""

from __future__ import annotations

from typing import Any

from waitress.task import ErrorTask

from .app import JSON_TYPE, error_response
from .errors import LicensedError

CODES = {
    400: "BAD_REQUEST",
    413: "PAYLOAD_TOO_LARGE",
    431: "HEADERS_TOO_LARGE",
    501: "NOT_IMPLEMENTED",
}
"""waitress' statuses and the codes they answer with; any other is ``INTERNAL_ERROR``."""


class JsonErrorTask(ErrorTask):
    def execute(self) -> None:
        request: Any = self.request  # waitress' parser, typed there as the error it carries
        error = request.error
        code = CODES.get(error.code, "INTERNAL_ERROR")
        message = f"{error.reason}: {error.body}" if error.body else error.reason
        body = error_response(LicensedError(message, code=code)).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers = [*self.response_headers, ("Content-Type", JSON_TYPE)]
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
