"""Adapters to cloud LLMs: one module per kind of upstream, one small protocol for all."""

from __future__ import annotations

from gateway.settings import UpstreamSettings
from gateway.upstream.base import Upstream, UpstreamRequest, UpstreamResponse


def build_upstream(name: str, settings: UpstreamSettings) -> Upstream:
    """The upstream adapter for `settings.provider`; litellm is imported only when used."""
    if settings.provider == "litellm":
        from gateway.upstream.litellm_provider import LiteLLMUpstream

        return LiteLLMUpstream(name, settings)
    if settings.client == "httptools":
        from gateway.upstream.http1 import Http1Upstream

        return Http1Upstream(name, settings)
    from gateway.upstream.openai_compat import OpenAICompatUpstream

    return OpenAICompatUpstream(name, settings)


__all__ = ["Upstream", "UpstreamRequest", "UpstreamResponse", "build_upstream"]
