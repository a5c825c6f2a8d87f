"""Mapping the work onto the device mesh: the mesh and the one table of logical axes
(sharding.py), the shard_map wrappers that run kernels on per-device blocks (blocks.py), ring
attention over the sequence axis (ring_attention.py), and the expert-parallel MoE dispatch
(experts.py). Each runs unchanged with no mesh: one device, a notebook."""
