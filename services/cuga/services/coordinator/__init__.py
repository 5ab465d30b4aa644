"""The coordinator service: a thin gRPC front over the :class:`CoordinatorAgent` engine."""
