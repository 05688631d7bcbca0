"""CLIP-style classification over class-name prompts (open_clip models): the loss the demo and the
MTIL command train with, and the logits they evaluate with."""
from __future__ import annotations

import torch
from torch import nn


def text_features(model, tokens: torch.Tensor) -> torch.Tensor:
    """Unit-norm embeddings of the tokenized class prompts (``classes×embed``)."""
    return nn.functional.normalize(model.encode_text(tokens), dim=-1)


def class_logits(model, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """``logit_scale · cos(image, class prompt)`` (``batch×classes``) for ``texts`` from
    :func:`text_features`."""
    return model.logit_scale.exp() * nn.functional.normalize(model.encode_image(images), dim=-1) @ texts.T


def classification_loss(model, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the classes' prompts; both towers are in the graph."""
    return nn.functional.cross_entropy(class_logits(model, images, text_features(model, tokens)), labels)
