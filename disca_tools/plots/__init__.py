"""Figures people look at (matplotlib, Agg backend); one module per tool family."""
