"""monolith-ps shard server: engine (pure numpy), checkpoint files, gRPC service."""

__version__ = "0.1.0"
