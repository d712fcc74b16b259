"""Token-drop occlusion (``occlusion.mode: token-drop``) on every ViT family it applies to.

The kernel's deltas are checked against a hand-written reference per family: the score with a
window's tokens removed, computed by calling the family's own modules one by one (patch
embedding, class/register tokens and position embeddings, blocks, final norm, head) on the
shortened sequence. Tiny random models (2 blocks, 32 px, 8 px patches), built as
``tests/_zoo.py`` builds them. Also: windows off the patch grid, models it does not fit, one
draw and no engine, passes of equal token counts, bitwise independence of grouping, the config
section, the pre-run check, run comparisons and the report's run facts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import attribute, load_config
from pipeline.audit.compare import map_settings
from pipeline.config import AuditConfig, ConfigError, OcclusionConfig
from pipeline.incremental.tokens import token_model
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.occlusion import occlude
from pipeline.kernel.options import ComputeOptions
from pipeline.kernel.tokens import kept_tokens
from pipeline.models import Normalized
from pipeline.report.facts import run_facts
from pipeline.run.preflight import ModelCheckError, probe_model
from pipeline.run.record import RunRecord
from tests._zoo import CLASSES, SIDE, gap_net, tiny_hf

PATCH = 8
_VIT = {"img_size": SIDE, "patch_size": PATCH, "depth": 2, "embed_dim": 32, "num_heads": 2}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
X = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def _timm(name: str, **kwargs: object) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=CLASSES, **{**_VIT, **kwargs})
    return _louder(model.eval())


def _louder(model: nn.Module) -> nn.Module:
    """Heads with unit-scale weights: scores and deltas of order 1, so 1e-5 is a tight check
    (random inits give logits of ~0.05, and torchvision's head starts at zero)."""
    gen = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if name.split(".")[0] in ("head", "heads", "classifier", "head_dist"):
            p.data = torch.randn(p.shape, generator=gen)
    return model


def _torchvision() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(SIDE, PATCH, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=CLASSES)  # fmt: skip
    return _louder(vit.eval())


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "timm-vit": lambda: _timm("vit_tiny_patch16_224"),
    # DeiT's class and distillation tokens: two prefix tokens, two heads averaged
    "timm-deit-distilled": lambda: _timm("deit_tiny_distilled_patch16_224"),
    # DINOv2-style: 4 register tokens, position embeddings of the patch tokens only, layer scale,
    # a dynamic image size (no fixed grid)
    "timm-dinov2-registers": lambda: _timm(
        "vit_small_patch14_reg4_dinov2", init_values=0.5, dynamic_img_size=True
    ),
    "timm-avg-pool": lambda: _timm("vit_tiny_patch16_224", class_token=False, global_pool="avg"),
    "torchvision-vit": _torchvision,
    "hf-vit": lambda: _louder(tiny_hf("vit")),
    "normalized-timm-vit": lambda: Normalized(_timm("vit_tiny_patch16_224"), MEAN, STD),
}


# The references: each family's modules called one by one, without the kernel or its hook.
def _timm_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    t = vit.patch_embed(x).flatten(1, -2)  # (B, N, D), also from a dynamic (B, Gh, Gw, D)
    extra = (vit.cls_token, getattr(vit, "dist_token", None), vit.reg_token)
    prefix = [p.expand(x.shape[0], -1, -1) for p in extra if p is not None]
    if vit.no_embed_class:
        return torch.cat([*prefix, t + vit.pos_embed], dim=1)
    return torch.cat([*prefix, t], dim=1) + vit.pos_embed


def _timm_head(vit: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return vit.forward_head(vit.norm(vit.blocks(vit.norm_pre(t))))


def _tv_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    t = vit.conv_proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
    cls = vit.class_token.expand(x.shape[0], -1, -1)
    return torch.cat([cls, t], dim=1) + vit.encoder.pos_embedding


def _tv_head(vit: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return vit.heads(vit.encoder.ln(vit.encoder.layers(t))[:, 0])


def _hf_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    emb = vit.vit.embeddings
    cls = emb.cls_token.expand(x.shape[0], -1, -1)
    return torch.cat([cls, emb.patch_embeddings(x)], dim=1) + emb.position_embeddings


def _hf_head(vit: nn.Module, t: torch.Tensor) -> torch.Tensor:
    for layer in vit.vit.layers:
        t = layer(t)
    return vit.classifier(vit.vit.layernorm(t)[:, 0])


@torch.inference_mode()
def reference(model: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``(B, O)`` scores of ``x`` with only the patch tokens ``keep`` ``(L,)`` kept."""
    if isinstance(model, Normalized):
        model, x = model.model, (x - model.mean) / model.std
    kind = type(model).__module__.split(".")[0]
    tokens, head, prefix = {
        "timm": (_timm_tokens, _timm_head, getattr(model, "num_prefix_tokens", 0)),
        "torchvision": (_tv_tokens, _tv_head, 1),
        "transformers": (_hf_tokens, _hf_head, 1),
    }[kind]
    t = tokens(model, x)  # (B, prefix + Gh * Gw, D)
    return head(model, torch.cat([t[:, :prefix], t[:, prefix:][:, keep]], dim=1))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, FAMILIES[request.param]()


# 16/8: nine windows of 2x2 tokens; 24/16: windows clipped at the edge keep 7, 10 and 12 tokens
@pytest.mark.parametrize(("window", "stride"), [(16, 8), (24, 16)])
def test_deltas_equal_the_family_modules_called_by_hand(family, window, stride):
    name, model = family
    everything = torch.arange((SIDE // PATCH) ** 2)
    clean = reference(model, X, everything)
    # the reference is the model: all tokens kept gives the library's own forward pass
    out = model(X)
    torch.testing.assert_close(clean, getattr(out, "logits", out), rtol=0, atol=1e-5)
    r = attribute(model, X, mode="token-drop", window=[window] * 2, stride=[stride] * 2)
    grid = WindowGrid.create((3, SIDE, SIDE), [window] * 2, [stride] * 2)
    assert r.delta.shape == (2, 1, *grid.counts) and torch.equal(r.delta_std, 0 * r.delta)
    delta = r.delta[:, 0].flatten(1)  # (N, P)
    tgt = r.target[:, 0]
    for p, keep in enumerate(kept_tokens(grid, (PATCH, PATCH))):
        dropped = reference(model, X, keep)
        want = (clean - dropped).gather(1, tgt[:, None])[:, 0]
        torch.testing.assert_close(delta[:, p], want, rtol=0, atol=1e-5, msg=f"{name} window {p}")
    assert float(delta.abs().max()) > 1e-2, "deltas this small would make the check vacuous"


def test_windows_off_the_patch_grid_name_the_setting_and_the_patch_size():
    model = FAMILIES["timm-vit"]()
    cases = [
        ({"window": [12, 12], "stride": [8, 8]}, r"occlusion\.window \[12, 12\].*patch size 8x8"),
        ({"window": [16, 16], "stride": [4, 4]}, r"occlusion\.stride \[4, 4\].*use \[8, 8\]"),
        ({"window": [1, 16, 16], "stride": [1, 8, 8]}, r"covers 1 of 3 channels"),
    ]
    for keywords, message in cases:
        with pytest.raises(ValueError, match=message):
            attribute(model, X, mode="token-drop", **keywords)
    dino = FAMILIES["timm-dinov2-registers"]()
    with pytest.raises(ValueError, match=r"image_size \[36, 36\].*8x8 patches; use \[32, 32\]"):
        attribute(dino, torch.rand(1, 3, 36, 36), mode="token-drop", window=[16, 16])
    with pytest.raises(ValueError, match=r"gives 5x5 patch tokens; the model takes 4x4"):
        attribute(model, torch.rand(1, 3, 40, 40), mode="token-drop", window=[16, 16])


class _Resize(nn.Module):
    """A wrapper that moves pixels before the ViT: token-drop must not reach through it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(nn.functional.interpolate(x.flip(-1), size=x.shape[-2:]))


def test_models_it_does_not_fit_are_refused_naming_their_class():
    import timm.models.vision_transformer as tv

    class ForwardFeatures(tv.VisionTransformer):
        def forward_features(self, x, attn_mask=None, is_causal=False):
            return super().forward_features(x)

    vit = FAMILIES["timm-vit"]()
    cases = [
        (gap_net(), r"applies to ViTs \(timm VisionTransformer.*the model is a SeedCNNWithGAP$"),
        (Normalized(gap_net(), MEAN, STD), r"the model is a Normalized around a SeedCNNWithGAP$"),
        (_Resize(vit), r"a _Resize holding a VisionTransformer.*keeps_pixel_positions = True"),
        (ForwardFeatures(**_VIT), r"ForwardFeatures: it overrides forward_features"),
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            token_model(model)
        with pytest.raises(ValueError, match=message):  # and through the public API
            attribute(model, X, mode="token-drop", window=[16, 16])
    with pytest.raises(ValueError, match=r"needs a model with patch_size, grid and forward_kept"):
        occlude(vit, X, mode="token-drop", window=[16, 16])  # the kernel takes token models only
    # a token model given to the API is used as it is (a custom ViT can bring its own)
    own = attribute(token_model(vit), X, mode="token-drop", window=[16, 16])
    assert torch.equal(own.delta, attribute(vit, X, mode="token-drop", window=[16, 16]).delta)


def test_one_draw_no_engine_and_no_baseline():
    model = FAMILIES["timm-vit"]()
    with pytest.raises(ValueError, match=r"n_baselines must be 1 in token-drop mode"):
        attribute(model, X, mode="token-drop", window=[16, 16], n_baselines=3)
    with pytest.raises(ValueError, match=r"engine 'incremental' does not apply to mode"):
        attribute(model, X, mode="token-drop", options=ComputeOptions(engine="incremental"))
    # the baseline settings change nothing: there is no fill
    a = attribute(model, X, mode="token-drop", window=[16, 16], baseline="zero")
    b = attribute(model, X, mode="token-drop", window=[16, 16], baseline="noise", seed=3)
    assert torch.equal(a.delta, b.delta)


def test_passes_hold_equal_token_counts_and_fixed_batches_are_bitwise_stable():
    model = FAMILIES["timm-deit-distilled"]()
    tokens = token_model(model)
    lengths = []
    forward_kept = tokens.forward_kept

    def spy(images: torch.Tensor, keep: torch.Tensor) -> object:
        lengths.append(tuple(keep.shape))
        return forward_kept(images, keep)

    tokens.forward_kept = spy  # type: ignore[method-assign]
    x = torch.rand(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(4))
    opts = ComputeOptions(engine="generic", fixed_batch=True, max_batch=4)
    together = occlude(tokens, x, mode="token-drop", window=[24, 24], stride=[16, 16], options=opts)
    # 4 windows keep 7, 10, 10 and 12 of 16 tokens; 3 images: passes of 3, 4+2 and 3 copies,
    # each padded to 4 rows
    assert lengths == [(4, 7), (4, 10), (4, 10), (4, 12)]
    for i in range(3):
        alone = occlude(tokens, x[i : i + 1], mode="token-drop", window=[24, 24],
                        stride=[16, 16], options=opts)  # fmt: skip
        assert torch.equal(alone.delta[0], together.delta[i])


def _config(tmp_path: Path, model: dict | None = None, **occlusion: object) -> AuditConfig:
    """An audit config (its model is only named: nothing is loaded)."""
    data = {"dataset": {"manifest": "m.parquet", "image_size": [SIDE, SIDE]},
            "model": model or {"timm": "vit_tiny_patch16_224"}, "occlusion": occlusion}  # fmt: skip
    return load_config(data, base_dir=str(tmp_path))


def test_the_config_section_and_its_refusals(tmp_path):
    occ = OcclusionConfig(mode="token-drop", window=(16, 16))
    assert occ.n_baselines == 1 and str(occ.mode) == "token-drop"
    assert OcclusionConfig().n_baselines == 3 and str(OcclusionConfig().mode) == "fill"
    for occlusion, message in [
        ({"mode": "token-drop", "n_baselines": 3}, r"occlusion\.n_baselines: must be 1 in token"),
        ({"mode": "token-drop", "engine": "approximate"}, r"occlusion\.engine: approximate does"),
        ({"mode": "token-drop", "window": [1, 16, 16]}, r"occlusion\.window: a token holds"),
        ({"mode": "tokens"}, r"occlusion\.mode"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _config(tmp_path, **occlusion)


def test_the_pre_run_check_refuses_before_any_worker(tmp_path):
    vit = {"timm": "vit_tiny_patch16_224", "kwargs": {"num_classes": CLASSES, **_VIT}}
    tokens = {"mode": "token-drop", "window": [16, 16]}
    probe_model(FAMILIES["timm-vit"](), _config(tmp_path, vit, **tokens))  # fits: no error
    off_grid = _config(tmp_path, vit, **{**tokens, "window": [12, 12], "stride": [12, 12]})
    with pytest.raises(ModelCheckError, match=r"model timm:vit_tiny.*occlusion\.window \[12, 12\]"):
        probe_model(FAMILIES["timm-vit"](), off_grid)
    cnn = {"factory": "pipeline.models:SeedCNNWithGAP", "kwargs": {"num_classes": CLASSES}}
    with pytest.raises(ModelCheckError, match=r"the model is a SeedCNNWithGAP$"):
        probe_model(gap_net(), _config(tmp_path, cnn, **tokens))


def test_comparisons_and_run_facts_name_the_mode(tmp_path):
    def settings(**occlusion: object) -> dict:
        return map_settings(RunRecord("r", _config(tmp_path, **occlusion)))

    fill, tokens = settings(), settings(mode="token-drop", window=[16, 16])
    assert fill["occlusion.mode"] == "fill" and tokens["occlusion.mode"] == "token-drop"
    # maps of the two modes are never compared as alike; token-drop has no fill settings
    assert settings(mode="token-drop", window=[16, 16], baseline="zero", value=0.5) == tokens
    assert settings(baseline="zero", n_baselines=1) != fill
    params = {"group_by": [], "threshold": 1, "min_images": 2, "confidence": 0.9, "bootstrap": 9,
              "seed": 0}  # fmt: skip
    record = RunRecord("r", _config(tmp_path, mode="token-drop", window=[16, 16]))
    occlusion = dict(run_facts(record, params))["Occlusion"]
    assert occlusion.startswith("mode: token-drop; window: [16, 16]")
    assert "baseline:" not in occlusion and "n_baselines: 1" in occlusion
