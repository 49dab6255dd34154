"""Client side of monolith-ps: routing, fan-out, fused ops and learning-rate functions."""
