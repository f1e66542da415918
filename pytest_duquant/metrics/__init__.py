"""Model-level measurement: records (what is measured), capture (hooks, memory), probe (measuring)."""
