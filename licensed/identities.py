"""Which customers a signed-in user owns.

A user (an identity provider's ``sub``) owns the customers linked to it in
``customer_identities``. A token that carries ``email`` with
``email_verified: true`` also claims every customer with that e-mail that no
other identity owns yet. Logto puts these claims into access tokens only when
told to (custom token claims); otherwise a checkout started with the user's
token links the buyer, and an admin can link a user by hand.
"""

from __future__ import annotations

from .errors import Conflict, NotFound
from .oidc import Identity
from .store import Store


def link_customer(store: Store, customer_id: str, sub: str, now: int, *, via: str = "checkout") -> bool:
    """Record that identity ``sub`` owns ``customer_id``; audited. True when newly linked.

    Idempotent for the same ``sub``; :class:`errors.Conflict` when the customer
    already belongs to another identity, :class:`errors.NotFound` when there is
    no such customer.
    """
    with store.atomic():
        if store.get_customer(customer_id) is None:
            raise NotFound(f"no customer {customer_id}")
        current = store.oidc_sub_of(customer_id)
        if current == sub:
            return False
        if current is not None:
            raise Conflict("this customer is linked to another sign-in")
        store.insert_customer_identity(customer_id, sub, via, now)
        store.audit(
            now,
            f"oidc:{sub}",
            "customer.link",
            None,
            None,
            {"customer_id": customer_id, "oidc_sub": sub, "via": via},
        )
    return True


def customers_of(store: Store, identity: Identity, now: int) -> list[str]:
    """Ids of the customers ``identity`` owns, first claiming unowned ones by verified e-mail."""
    email = identity.verified_email
    if email and store.unlinked_customer_ids_by_email(email):
        with store.atomic():
            # Read again under the write lock: a concurrent request may have linked them.
            for customer_id in store.unlinked_customer_ids_by_email(email):
                link_customer(store, customer_id, identity.sub, now, via="verified_email")
    return store.customer_ids_for_sub(identity.sub)
