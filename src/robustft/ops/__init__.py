"""Pure tensor maths shared by the model, methods and CLI layers; no state, no models.

- :mod:`robustft.ops.cam`: MMCAM / Grad-CAM rules on attention maps and activations.
- :mod:`robustft.ops.masking`: masking strategies, donors, refills, token keep / key masks.
- :mod:`robustft.ops.weights`: weight-space interpolation of state dicts (WiSE-FT).
- :mod:`robustft.ops.precision`: float32 regions inside a bf16 autocast.
"""

from robustft.ops import cam, masking, precision, weights

__all__ = ["cam", "masking", "precision", "weights"]
