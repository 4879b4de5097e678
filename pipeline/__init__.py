"""The ML library of the loop: one module per stage, no orchestration or HTTP here."""
