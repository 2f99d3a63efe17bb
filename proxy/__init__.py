"""cognito-sidecar: adds an Amazon Cognito token to every request a legacy service sends to API Gateway."""

from __future__ import annotations

__version__ = "0.1.0"
