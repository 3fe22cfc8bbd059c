"""CLIP's text tower as a module of its own, and zero-shot heads rebuilt from it.

Methods that train the text tower (FLYP and its descendants) need the text side of an
open_clip model without its image tower: :class:`TextTower` holds exactly the parameters
``encode_text`` uses, plus ``logit_scale``, under open_clip's own names, so its state dict
is the non-``visual.`` part of the CLIP model's state dict (``model.load_state_dict(
tower.state_dict(), strict=False)`` writes a trained tower back into a CLIP model).

After (or during) training, the classification head is rebuilt from the CURRENT tower with
:func:`zeroshot_head_from_text` or written into an existing classifier with
:func:`refresh_head`: CLIP's recipe (every template per class, encode, L2-normalise, mean,
L2-normalise; weight ``exp(logit_scale) * W``, zero bias), without the disk cache (the
weights change every step) and without autograd.

The tokenizer stays outside (``ClipBundle.tokenizer``); the tower takes token ids.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from robustft.errors import CheckpointError, ConfigError, ModelError
from robustft.model.classifier import ClassifierHead, ImageClassifier
from robustft.model.zeroshot import build_zeroshot_weights
from robustft.safeio import load_tensors, save_tensors

__all__ = ["TextTower", "zeroshot_weights_from_text", "zeroshot_head_from_text", "refresh_head",
           "TEXT_TOWER_FILE", "save_text_tower", "load_text_tower_into"]

#: A run folder's trained text tower (methods that train it): the tower's state dict.
TEXT_TOWER_FILE = "text_tower.safetensors"

# What open_clip.CLIP.encode_text reads from the model (a CustomTextCLIP keeps it all in `.text`).
_CLIP_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


class TextTower(nn.Module):
    """The text encoder of an open_clip ``CLIP`` or ``CustomTextCLIP``, and its ``logit_scale``.

    State-dict keys are the CLIP model's own: for ``open_clip.CLIP`` ``token_embedding.weight``,
    ``positional_embedding``, ``transformer.resblocks.<i>....``, ``ln_final.*``,
    ``text_projection``; for ``CustomTextCLIP`` ``text.*``; then ``logit_scale`` (and
    ``logit_bias`` where the model has one). The image tower is not held.

    Build it with :meth:`from_clip`; ``TextTower(model)`` itself SHARES the model's
    Parameter objects (training the tower trains the model's text side).

    Attributes:
        logit_scale: CLIP's log temperature (a Parameter, trainable; not used by :meth:`encode`).
        context_length: Tokens per caption the tower expects.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        text = getattr(model, "text", None)
        self.custom = isinstance(text, nn.Module)
        if self.custom:
            self.text = text
        else:
            missing = [name for name in _CLIP_TEXT_PARTS if not hasattr(model, name)]
            if missing:
                raise ModelError(
                    f"{type(model).__name__} is not an open_clip CLIP or CustomTextCLIP model (it lacks "
                    f"{', '.join(missing)}); pass bundle.model from robustft.model.load_clip"
                )
            self.token_embedding = model.token_embedding
            self.positional_embedding = model.positional_embedding
            self.transformer = model.transformer
            self.ln_final = model.ln_final
            self.text_projection = model.text_projection
            self.register_buffer("attn_mask", getattr(model, "attn_mask", None), persistent=False)
            self.text_pool_type = getattr(model, "text_pool_type", "argmax")
            self.text_eos_id = getattr(model, "text_eos_id", None)
        if not isinstance(getattr(model, "logit_scale", None), nn.Parameter):
            raise ModelError(f"{type(model).__name__} has no logit_scale parameter; pass an open_clip CLIP model")
        self.logit_scale = model.logit_scale
        if isinstance(getattr(model, "logit_bias", None), nn.Parameter):
            self.logit_bias = model.logit_bias
        self.context_length = int(getattr(model, "context_length", getattr(text, "context_length", 77)))

    @classmethod
    def from_clip(cls, model: nn.Module, *, copy: bool = True) -> TextTower:
        """The text tower of ``model``, every parameter with ``requires_grad=True``.

        Args:
            model: An open_clip ``CLIP`` or ``CustomTextCLIP`` (``ClipBundle.model``).
            copy: True (default): an independent deep copy (the model is untouched). False:
                share the model's Parameter objects (no memory cost; updates to one are
                updates to the other, and the model's text parameters become trainable too).
        """
        tower = cls(model)
        if copy:
            tower = copy_module.deepcopy(tower)
        tower.requires_grad_(True)
        return tower

    def encode(self, tokens: Tensor) -> Tensor:
        """Token ids [N, context_length] (int64) -> text features [N, D], NOT normalised.

        The same computation as ``model.encode_text(tokens)`` of the model it came from.
        """
        if self.custom:
            features: Tensor = self.text(tokens)
            return features
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast_dtype) + self.positional_embedding.to(cast_dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = text_global_pool(x, tokens, self.text_pool_type, eos_token_id=self.text_eos_id)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """open_clip's spelling of :meth:`encode`, optionally L2-normalised (for code written for CLIP)."""
        features = self.encode(tokens)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def forward(self, tokens: Tensor) -> Tensor:
        """Same as :meth:`encode`."""
        return self.encode(tokens)


def zeroshot_weights_from_text(
    text_tower: TextTower,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_classes: int = 10,
) -> Tensor:
    """Zero-shot class embeddings W [C, D] (unit rows) from the tower's CURRENT weights.

    Per class: each template filled in, encoded, L2-normalised; the mean over templates
    L2-normalised again. No disk cache, no autograd, the tower in eval mode for the pass
    (its mode is restored), autocast off (the tower's own dtype).

    Args:
        text_tower: The text tower (its device is used for the tokens).
        tokenizer: ``ClipBundle.tokenizer``.
        classnames: C class names in label order.
        templates: T format strings with one ``{}`` each.
        batch_classes: Classes per text-tower call (``batch_classes * T`` prompts).

    Returns:
        W [C, D] in the tower's dtype, on its device.
    """
    if len(classnames) == 0:
        raise ConfigError("no class names given for the zero-shot head")
    device = next(text_tower.parameters()).device
    was_training = text_tower.training
    text_tower.eval()
    kind = device.type
    available = torch.amp.is_autocast_available(kind)
    no_autocast = torch.autocast(kind, enabled=False) if available else contextlib.nullcontext()
    try:
        with no_autocast:
            return build_zeroshot_weights(text_tower, tokenizer, classnames, templates, batch_classes=batch_classes,
                                          device=device, progress=False, use_cache=False)
    finally:
        text_tower.train(was_training)


def zeroshot_head_from_text(
    text_tower: TextTower,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_classes: int = 10,
) -> ClassifierHead:
    """A new :class:`ClassifierHead`: weight ``exp(text_tower.logit_scale) * W``, zero bias.

    W is :func:`zeroshot_weights_from_text` (arguments as there).
    """
    weights = zeroshot_weights_from_text(text_tower, tokenizer, classnames, templates, batch_classes=batch_classes)
    return ClassifierHead.from_zeroshot(weights, text_tower.logit_scale)


def refresh_head(
    classifier: ImageClassifier,
    text_tower: TextTower,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_classes: int = 10,
) -> None:
    """Overwrite ``classifier.head`` in place with the head rebuilt from ``text_tower``.

    ``head.weight <- exp(logit_scale) * W`` and ``head.bias <- 0`` (W as in
    :func:`zeroshot_weights_from_text`); the Parameter objects stay the same, so optimisers
    and DDP wrappers holding them see the new values. Every rank of a job computes the
    same head from its (identical) tower; nothing is communicated.

    Raises:
        ModelError: the head's shape [C, D] does not match ``len(classnames)`` and the
            tower's embedding width.
    """
    weights = zeroshot_weights_from_text(text_tower, tokenizer, classnames, templates, batch_classes=batch_classes)
    head = classifier.head
    if tuple(head.weight.shape) != tuple(weights.shape):
        raise ModelError(
            f"classifier head is {tuple(head.weight.shape)} but the text tower gives {tuple(weights.shape)} "
            f"for {len(classnames)} classes; build the classifier with these class names and this CLIP model"
        )
    scale = text_tower.logit_scale.detach().to(weights.dtype).reshape(()).exp()
    with torch.no_grad():
        head.weight.copy_(weights * scale)
        head.bias.zero_()


def save_text_tower(tower: TextTower, folder: str | os.PathLike[str]) -> Path:
    """Write ``tower``'s state dict to ``folder/text_tower.safetensors`` (atomically); returns the path."""
    path = Path(folder) / TEXT_TOWER_FILE
    save_tensors(path, tower.state_dict(), metadata={"format": "robustft text tower"})
    return path


def load_text_tower_into(tower: TextTower, folder: str | os.PathLike[str]) -> None:
    """Load ``folder/text_tower.safetensors`` into ``tower`` (same architecture), checking every name and shape.

    Raises:
        CheckpointError: The file is missing or unreadable, or belongs to another model.
    """
    path = Path(folder) / TEXT_TOWER_FILE
    device = next(tower.parameters()).device
    tensors, _ = load_tensors(path, device=device)
    expected = tower.state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [f"{k}: {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
                 for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise CheckpointError(f"{path} is not a text tower of this model: {shown}")
    tower.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
