"""jaxreco: a JAX research framework for e-commerce recommendation."""

__version__ = "0.1.0"
