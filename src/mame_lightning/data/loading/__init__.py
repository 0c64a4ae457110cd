"""A prepared set feeding training: the dataset reader, the Lightning datamodule, the latent cache,
resumable samplers, inpainting masks and the healthy-image mix."""
