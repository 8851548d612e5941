"""Layer 4: the sweep runner, the results writer and the demo. Imports from the layers below."""
