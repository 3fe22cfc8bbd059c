"""robustft: robust fine-tuning of CLIP models.

Fine-tune a pre-trained vision-language model on your data without losing the robustness
to distribution shift that pre-training gave it. The flagship method masks the object or
the context patches of each image (chosen by a class activation map), refills them with
patches of other images, and distils the frozen pre-trained model's features on these
counterfactual images (Xiao et al., CVPR 2023).
"""

__version__ = "0.1.0"
