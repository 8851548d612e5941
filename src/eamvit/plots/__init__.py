"""Layer 5: figures. Data in, PNG out; a plot never runs a model."""
