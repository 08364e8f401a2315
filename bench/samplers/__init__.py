"""Samplers shared by the models: SGLD with a replay buffer (JEM, IGEBM), annealed Langevin (NCSN),
block Gibbs / PCD (RBM), ancestral (VAE, flows, autoregressive models)."""
