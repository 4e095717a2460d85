"""Queueing mail: a row in the outbox, written in the transaction that makes its licence.

SMTP down means late, never lost: :mod:`mailer` sends what is queued here.
A row holds only the licence id, the kind of message and the recipient; the
body, and the key in it, are rendered from the licence row when it is sent.
"""

from __future__ import annotations

import logging

from .addresses import check_address, check_display_name
from .errors import InvalidEmail, ValidationFailed
from .store import Store

log = logging.getLogger("licensed.mail")

KIND_LICENSE_KEY = "license_key"
KIND_LICENSE_KEY_RESEND = "license_key_resend"
KIND_SIGN_IN_LINK = "sign_in_link"
"""A one-time link to the account pages; its row points at the link (``sign_in_id``), not a licence."""
KINDS = (KIND_LICENSE_KEY, KIND_LICENSE_KEY_RESEND, KIND_SIGN_IN_LINK)
LICENSE_KINDS = (KIND_LICENSE_KEY, KIND_LICENSE_KEY_RESEND)
"""Kinds about a licence, queued by :func:`queue_mail`."""


def queue_mail(store: Store, license_id: str, kind: str, to_addr: str, to_name: str | None, now: int) -> int:
    """Check the recipient and kind, then queue: call inside the licence's transaction.

    The checked way in to :meth:`store.Store.enqueue_mail`; the same checks
    run again at send time for rows queued by any other path. An address no
    header may carry raises :class:`errors.InvalidEmail`; a name no header may
    carry (one Stripe holds, say) is left out with a warning, and the mail goes.
    """
    if kind not in LICENSE_KINDS:
        raise ValidationFailed(f"unknown kind of mail about a license {kind!r}")
    to_addr = check_address(to_addr)
    try:
        to_name = check_display_name(to_name)
    except InvalidEmail as err:
        log.warning(
            "recipient's name left out of the mail",
            extra={"license_id": license_id, "kind": kind, "error": err.message},
        )
        to_name = None
    return store.enqueue_mail(license_id, kind, to_addr, to_name, now)
