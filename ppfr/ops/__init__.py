"""ppfr ops: one module per op family with the reference, the torch.library registration and dispatch.

Import ops from their modules (``from ppfr.ops.roi_mask import roi_mask``) or from the top level (``ppfr.roi_mask``).
This package does not re-export functions that share their module's name (``roi_mask``, ``sample_ranks``,
``feature_mask_fuse``): a package attribute would shadow the submodule for ``import ppfr.ops.roi_mask as m``.
"""
