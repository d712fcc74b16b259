"""Token models of the ViT families (``occlusion.mode: token-drop``).

:func:`token_model` gives a model the ``forward_kept`` of :class:`~pipeline.kernel.tokens.
TokenModel`: it runs the *whole* model (any normalisation or output selection around the ViT
included) with a forward hook on the module whose output is the token sequence with position
embeddings added, replacing that output by the class/register tokens and the kept patch tokens.
Each kept token so keeps its own position embedding, and the blocks, final norm and head run on
the shorter sequence exactly as the library wrote them. Known families:

- timm ``VisionTransformer`` and its subclasses (ViT, DeiT with its distillation token,
  DINOv2-style register tokens): the output of ``patch_drop`` (after ``_pos_embed``);
- torchvision ``VisionTransformer``: the output of ``encoder.dropout`` (after the position
  embedding, before the layers);
- Hugging Face ``ViTForImageClassification``: the output of ``vit.embeddings.dropout``.

Classes are recognised by their module and name along the MRO, so none of these optional
libraries is imported here. A model is reached through wrappers whose class sets
``keeps_pixel_positions = True`` (``pipeline.models.Normalized``, ``SelectOutput``): their
``.model`` sees the same pixels at the same places. Anything else is refused with one line
naming its class: removing a token only removes a window's pixels when each token sees its own
patch alone and nothing moves pixels before the ViT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.kernel.tokens import TokenModel

__all__ = ["TokenDrop", "token_model"]

_TIMM = "timm.models.vision_transformer.VisionTransformer"
_TORCHVISION = "torchvision.models.vision_transformer.VisionTransformer"
_HF = "transformers.models.vit.modeling_vit.ViTForImageClassification"
KNOWN = (
    "timm VisionTransformer (and subclasses: DeiT, DINOv2-style), torchvision "
    "VisionTransformer or Hugging Face ViTForImageClassification"
)


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _base(model: Any) -> type | None:
    """The known family class ``model`` is an instance of, or None."""
    return next((c for c in type(model).__mro__ if _name(c) in (_TIMM, _TORCHVISION, _HF)), None)


@dataclass(frozen=True)
class _Layout:
    """Where a family's token sequence is, and its geometry."""

    stage: nn.Module  # its output: (B, prefix + Gh * Gw, D) tokens, position embeddings added
    prefix: int  # class (and register/distillation) tokens ahead of the patch tokens
    patch: tuple[int, int]  # pixels per patch token
    grid: tuple[int, int] | None  # patch tokens of the model's images; None: any size


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def _one_patch_per_token(proj: Any, patch: tuple[int, int]) -> bool:
    """Whether ``proj`` embeds each patch on its own (a conv with kernel = stride = patch)."""
    return (
        isinstance(proj, nn.Conv2d)
        and tuple(proj.kernel_size) == patch
        and tuple(proj.stride) == patch
        and tuple(proj.padding) == (0, 0)
    )


def _overrides(model: Any, base: type, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if getattr(type(model), n) is not getattr(base, n)]


def _layout(vit: Any, base: type) -> _Layout | str:
    """The token layout of ``vit`` (an instance of the family class ``base``), or why there is
    none."""
    kind = _name(base)
    if kind == _TIMM:
        changed = _overrides(vit, base, ("forward", "forward_features"))
        patch, proj = _pair(vit.patch_embed.patch_size), getattr(vit.patch_embed, "proj", None)
        grid = None if vit.dynamic_img_size else _pair(vit.patch_embed.grid_size)
        layout = _Layout(vit.patch_drop, int(vit.num_prefix_tokens), patch, grid)
    elif kind == _TORCHVISION:
        changed = _overrides(vit, base, ("forward", "_process_input"))
        patch, proj = _pair(vit.patch_size), vit.conv_proj
        grid = (vit.image_size // patch[0], vit.image_size // patch[1])
        layout = _Layout(vit.encoder.dropout, 1, patch, grid)
    else:
        changed = _overrides(vit, base, ("forward",))
        emb, cfg = vit.vit.embeddings, vit.config
        patch, proj = _pair(cfg.patch_size), emb.patch_embeddings.projection
        size = _pair(cfg.image_size)
        layout = _Layout(emb.dropout, 1, patch, (size[0] // patch[0], size[1] // patch[1]))
    if changed:
        return f"it overrides {', '.join(changed)} of {base.__qualname__}"
    if not _one_patch_per_token(proj, patch):
        return f"its patch embedding ({type(proj).__name__}) does not embed each patch on its own"
    return layout


class TokenDrop(nn.Module):
    """``model`` with ``forward_kept``: a :class:`~pipeline.kernel.tokens.TokenModel`.

    Calling it calls ``model``. Build it with :func:`token_model`.

    Attributes:
        patch_size: ``(ph, pw)`` pixels per token.
        grid: ``(Gh, Gw)`` patch tokens of the images the model takes, or None (any size).
        family: the ViT's class, e.g. ``"timm VisionTransformer"``.
    """

    def __init__(self, model: nn.Module, layout: _Layout, family: str) -> None:
        super().__init__()
        self.model = model
        self.patch_size, self.grid, self.family = layout.patch, layout.grid, family
        self.prefix = layout.prefix
        # by name: the stage is a submodule of ``model``, not a second child of this module
        self.stage = next(n for n, m in model.named_modules() if m is layout.stage)

    def forward(self, images: torch.Tensor) -> Any:
        return self.model(images)  # (B, C, H, W) -> the model's output

    def forward_kept(self, images: torch.Tensor, keep: torch.Tensor) -> Any:
        """The model's output for ``images`` ``(B, C, H, W)`` with only the patch tokens ``keep``
        ``(B, L)`` (row-major grid indices) and the prefix tokens kept.

        Raises:
            RuntimeError: the token sequence is not ``prefix + Gh * Gw`` tokens long, or the
                hooked stage did not run exactly once (the drop would silently not happen).
        """
        ph, pw = self.patch_size
        expected = self.prefix + (images.shape[-2] // ph) * (images.shape[-1] // pw)
        calls = []

        def drop(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(out.shape))
            if out.dim() != 3 or out.shape[1] != expected:
                raise RuntimeError(
                    f"{self.family}: expected {expected} tokens ({self.prefix} prefix) at "
                    f"{self.stage}, got shape {tuple(out.shape)}"
                )
            idx = (keep.to(out.device) + self.prefix)[..., None].expand(-1, -1, out.shape[-1])
            return torch.cat([out[:, : self.prefix], out.gather(1, idx)], dim=1)  # (B, P+L, D)

        handle = self.model.get_submodule(self.stage).register_forward_hook(drop)
        try:
            out = self.model(images)
        finally:
            handle.remove()
        if len(calls) != 1:
            raise RuntimeError(
                f"{self.family}: {self.stage} ran {len(calls)} times in one forward pass; "
                "token-drop needs it once"
            )
        return out


def token_model(model: nn.Module) -> TokenModel:
    """``model`` as a :class:`~pipeline.kernel.tokens.TokenModel` for ``mode="token-drop"``.

    Args:
        model: a ViT of a known family (module docstring), itself or inside wrappers that keep
            pixel positions (``keeps_pixel_positions = True``, e.g. ``Normalized``); or a model
            that already is a ``TokenModel`` (a custom ViT's own), returned as it is.

    Returns:
        A :class:`TokenDrop` around ``model`` (a new one per call; building it is cheap).

    Raises:
        ValueError: one line naming the model's class and why token-drop does not apply.

    Example:
        >>> token_model(torch.nn.Linear(2, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: occlusion.mode token-drop applies to ViTs ...; the model is a Linear
    """
    if isinstance(model, TokenModel):
        return model
    inner: Any = model
    path = [type(model).__name__]
    while _base(inner) is None and getattr(type(inner), "keeps_pixel_positions", False):
        inner = inner.model
        path.append(type(inner).__name__)
    base = _base(inner)
    where = " around a ".join(path)
    if base is None:
        modules = inner.modules() if isinstance(inner, nn.Module) else []  # or a function
        held = [m for m in modules if _base(m) is not None]
        if held:
            raise ValueError(
                f"occlusion.mode token-drop: the model is a {where} holding a "
                f"{type(held[0]).__name__}, and {type(inner).__name__} may move pixels before it; "
                "pass the ViT itself, or set keeps_pixel_positions = True on that class if its "
                "forward gives the ViT the same pixels at the same places"
            )
        raise ValueError(
            f"occlusion.mode token-drop applies to ViTs ({KNOWN}); the model is a {where}"
        )
    layout = _layout(inner, base)
    if isinstance(layout, str):
        raise ValueError(f"occlusion.mode token-drop does not fit the model {where}: {layout}")
    family = f"{base.__module__.split('.')[0]} {type(inner).__name__}"
    return TokenDrop(model, layout, family)
