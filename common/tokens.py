"""The cloud service's bearer token, shared by the service and the edge runtime CLIs."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TOKEN_ENV = "CEDAR_CLOUD_TOKEN"


def resolve_token(token: str | None, token_file: str | None) -> str:
    """``token_file`` if given, else ``token``, else ``$CEDAR_CLOUD_TOKEN``; ValueError if none is set."""
    if token_file:
        try:
            value = Path(token_file).expanduser().read_text().strip()
        except OSError as err:
            raise ValueError(f"cannot read --token-file {token_file}: {err}") from None
    else:
        value = (token or os.environ.get(TOKEN_ENV, "")).strip()
    if not value:
        raise ValueError(f"a bearer token is required: --token, --token-file or ${TOKEN_ENV}")
    return value


def new_token_file(path: str | Path) -> str:
    """Write a fresh random bearer token (256 bits, URL-safe) to ``path``, readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token
