"""flashcomm: FlashComm2 + layer-sharded weights (O-Shard) for tensor-parallel LLM inference."""

__version__ = "0.1.0"
