"""HTTP serving for models exported by :mod:`jaxreco.export`.

This package runs in the serving image, which has TensorFlow and no JAX: nothing under
``jaxreco.serve`` may import ``jax`` (a test runs the server with JAX blocked). Import the
submodules you need; this file imports nothing.
"""
