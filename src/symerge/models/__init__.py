"""Model adapters: turn checkpoints into (encoder module, per-task heads) pairs the engine understands."""
