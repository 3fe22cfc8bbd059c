"""The composition root: the only code that sees the whole run config."""
