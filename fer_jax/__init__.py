"""fer_jax: facial expression recognition with JAX and Flax."""
