"""mfa-service: the internal async gRPC service that owns users' second factor.

Layers (arrows point down only): ``transport`` (servicer, interceptors) -> ``service``
(rules and transactions) -> ``factors`` (one module per method) and ``store``
(SQLAlchemy) -> the ground floor (``settings``, ``errors``, ``clock``, ``crypto``,
``domain``). See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
