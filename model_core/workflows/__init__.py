"""What the bundle's JSON configs instantiate: episode datasets and prepare-batch, inferers, Ignite
handlers (checkpoints and resumption, gradient clipping, confidence files), metrics, the glue of
automatic proposals and of LiteMedSAM's box inference."""
