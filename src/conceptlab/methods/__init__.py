"""Ways of teaching the frozen backbone a concept: one file per method, one interface (base.Method)."""
