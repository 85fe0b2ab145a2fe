"""The embedded default: a tiny model, a learnable task, and a local fine-tune of it."""
