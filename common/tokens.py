"""The cloud service's bearer token, shared by the service and the edge runtime CLIs."""

from __future__ import annotations

import os
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
