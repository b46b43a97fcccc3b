"""The one internal failure of authentication, carrying the reason for the log only."""

from __future__ import annotations


class AuthFailure(Exception):
    """Credentials were refused. ``reason`` goes to the log; the client sees only
    "invalid credentials", so a caller cannot tell which check failed."""

    def __init__(self, reason: str, credential_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.credential_id = credential_id
