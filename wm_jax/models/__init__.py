"""The networks and how they are trained: V (vae), M (transition), K (verifier), C (controller),
their layers and INT8 quantization (layers, quant), and the one resumable training loop (train).
They import only wm_jax.store and the ground modules below them."""
