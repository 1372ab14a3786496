"""DifFeed: the paper's feedback head, trained with the frozen U-Net in the loop.

network.py: the blocks, their skip partners and the DifFeed module; images.py: the labelled images it
trains on; training.py: the seeded, resumable training loop and its checkpoints.

This is the one probe that runs the U-Net (everything else in `probe` reads stores only), because its input
is not a cacheable feature: pass 2 depends on the feedback layers being trained.

Mechanics (docs: /work/shared/PAPER.md), at one timestep t (the paper's 150):
- pass 1, without gradients, gives the decoder outputs of the feedback blocks;
- each feedback block b has a layer Conv1x1 (no bias) + BatchNorm + ReLU mapping its map to the channels of
  its skip partner, the encoder block `num_blocks + 1 - b` (38 - b on the 256 models);
- pass 2 runs with each layer's output added to its partner's output (the sum is also what the skip carries,
  see `ADMUNet.features(additions=...)`), and an `AttentionPoolHead` reads the read block of pass 2.
Only the feedback layers and the head train; the U-Net is frozen (no parameter needs a gradient, so none gets a
`.grad`), while gradients flow through its pass-2 activations back to the feedback layers.

Default blocks, for any ADM configuration (R = num_res_blocks, L = len(channel_mult)): one feedback per
resolution level, namely the decoder block whose skip comes from the first ResBlock of each encoder level
(encoder blocks 2 + l (R + 1), l = 0..L-1); the read block is the second-deepest of them (the deepest when
L = 1). On the 256 models (R = 2, L = 6) this gives the paper's lists exactly: feedback {21, 24, 27, 30, 33, 36}
into {17, 14, 11, 8, 5, 2}, read block 24. On the embedded Fashion-MNIST model (19 blocks): {12, 15, 18} into
{8, 5, 2}, read block 15.

Noise: training epoch e draws the noise of draw e, evaluation always draw 0, each keyed by (seed, sample key, t,
draw) with `extract.diffusion.seeded_noise`; so every epoch sees fresh noise, a rerun is exact, and draw 0 is
the noise an extraction with the same seed stores. With no feedback blocks the same trainer is the plain attention
head on live U-Net features (the paper's protocol, noise as augmentation): the baseline DifFeed is compared with.
"""
