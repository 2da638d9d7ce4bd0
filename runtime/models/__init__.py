"""What a forward pass computes: architectures, the decoder, its ops and weights."""
