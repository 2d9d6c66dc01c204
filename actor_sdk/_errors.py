"""The SDK's errors: one root, `SdkError`, so callers can catch everything of ours."""

from __future__ import annotations

__all__ = ["BrokerUrlError", "SdkError"]


class SdkError(Exception):
    """The root of every error the actor SDK raises itself."""


class BrokerUrlError(SdkError, ValueError):
    """A broker URL or connection option the SDK cannot use (the caller's mistake)."""
