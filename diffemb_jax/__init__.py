"""diffemb-jax: text embeddings from diffusion and autoregressive LMs, in JAX."""
