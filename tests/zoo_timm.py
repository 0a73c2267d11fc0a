"""The models people deploy: timm architectures with distinct norm placements and Hugging Face ``transformers``
models (random weights, randomized norm statistics, small inputs), folded in each capture mode.

For each model and capture (``symbolic``, ``export``, ``auto``): norms found (candidates the report accounts for),
folded, left by reason *category* (:func:`category`), BNs ``torch.fx.experimental.optimization.fuse`` leaves, and
the verdict of the float64 parity rule. Used by ``tests/test_zoo_timm.py`` (a representative few by default, the
rest with ``BNFOLD_SLOW=1``) and ``bench/zoo_timm.py`` (the table in BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import bnfold
from bnfold.errors import BnfoldError, InternalError

# timm name -> input size (px); the model is built with num_classes=10 (and img_size where the model takes it)
TIMM: dict[str, int] = {
    "resnet10t": 64, "resnet26d": 64, "seresnext26d_32x4d": 64, "resnest14d": 64, "regnetx_002": 64,
    "regnety_002": 64, "regnetz_005": 64, "mobilenetv2_050": 64, "mobilenetv3_small_050": 64,
    "mobilenetv4_conv_small": 64, "efficientnet_lite0": 64, "mixnet_s": 64, "tinynet_e": 64, "ghostnet_050": 64,
    "ghostnetv2_100": 64, "repghostnet_050": 64, "hardcorenas_a": 64, "fbnetc_100": 64, "mnasnet_050": 64,
    "lcnet_050": 64, "rexnet_100": 64, "ese_vovnet19b_dw": 64, "cs3darknet_s": 64, "dla46_c": 64, "dpn48b": 64,
    "densenet121": 64, "hrnet_w18_small": 64, "xception41": 64, "gernet_s": 64, "repvgg_a0": 64,
    "mobileone_s0": 64, "fastvit_t8": 64, "fasternet_t0": 64, "starnet_s050": 64, "convnext_atto": 64,
    "convnextv2_atto": 64, "edgenext_xx_small": 64, "inception_next_atto": 64, "poolformer_s12": 64,
    "mobilevit_xxs": 64, "mobilevitv2_050": 64, "efficientvit_b0": 64, "efficientvit_m0": 224,
    "levit_128s": 224, "efficientformer_l1": 224, "tiny_vit_5m_224": 224, "coatnet_nano_rw_224": 224,
    "vit_tiny_patch16_224": 64, "deit_tiny_patch16_224": 64, "nf_resnet26": 64, "resnetv2_50x1_bit": 64,
}

# the default run's subset: one per family that stresses a different part of the engine
FAST = ["resnet10t", "mixnet_s", "mobileone_s0", "levit_128s", "vit_tiny_patch16_224", "convnext_atto"]

NORM_CLASS = re.compile(r"(BatchNorm|LayerNorm|GroupNorm|InstanceNorm|RMSNorm)", re.I)

# why a norm is left, by category: (category, pattern over the report's reason). docs/architecture.md lists each
# category as unfoldable without duplicating compute (or changing what other paths compute).
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("shared tensor (other paths read it)", re.compile(r"also feeds|has other users|other users|has \d+ users")),
    ("between nonlinearities (no conv/linear it can reach)", re.compile(
        r"not a conv/linear|does not commute|stays in the norm|not a single-input|no conv/linear consumer|"
        r"acts on a pooled|not positive|does not move|no longer vary|reduces its channel|is not an op")),
    ("zero padding blocks the shift", re.compile(r"pads with (zeros|the constant)")),
    ("a graph input/output", re.compile(r"graph input|its output is unused|graph output")),
]


def category(reason: str) -> str:
    """The category of a reason a norm was left (``"other: …"`` when none matches: a gap to look at)."""
    for name, pat in CATEGORIES:
        if pat.search(reason):
            return name
    return "other: " + reason[:120]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics for every BatchNorm, random affine parameters for every norm (so no fold is an
    identity by accident); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if NORM_CLASS.search(type(m).__name__):
                for name in ("weight", "bias"):
                    p = getattr(m, name, None)
                    if isinstance(p, torch.Tensor) and p.is_floating_point():
                        base = 1.0 if name == "weight" else 0.0
                        p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def timm_model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import timm

    px = TIMM[name]
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=10, img_size=px)
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=10)
    return randomize_norms(model), (torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(1)),)


def n_norms(model: nn.Module) -> int:
    """Norm modules in ``model`` (a norm class nested in another norm counts once)."""
    count = 0
    for _, m in model.named_modules():
        if NORM_CLASS.search(type(m).__name__) and not any(
                NORM_CLASS.search(type(c).__name__) for c in m.children()):
            count += 1
    return count


def left_by_fx_fuse(model: nn.Module) -> int | None:
    """BatchNorm modules ``torch.fx.experimental.optimization.fuse`` leaves (None when it cannot trace)."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(copy.deepcopy(model))
    except Exception:
        return None
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())


@dataclass
class Row:
    model: str
    capture: str
    norms: int
    found: int = 0
    folded: int = 0
    left: Counter[str] = field(default_factory=Counter)
    folded_paths: frozenset[str] = frozenset()
    parity: bool | None = None
    used: str = ""
    seconds: float = 0.0
    error: str = ""


def fold_row(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], capture: str,
             check_batches: list[tuple[torch.Tensor, ...]] | None = None) -> Row:
    """Fold ``model`` in ``capture`` mode and judge parity (float64 rule) on ``check_batches`` (default: the
    inputs)."""
    row = Row(name, capture, n_norms(model))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = bnfold.fold(model, inputs, capture=capture, check=False)  # type: ignore[arg-type]
    except InternalError:  # a bnfold bug: never a row, always a failure
        raise
    except BnfoldError as err:
        row.error = str(err).splitlines()[0][:160]
        row.seconds = time.perf_counter() - start
        return row
    row.seconds = time.perf_counter() - start
    report = result.report
    row.used = report.capture
    row.folded = len(report.folded)
    row.found = row.folded + len(report.skipped)
    row.left = Counter(category(s.reason) for s in report.skipped)
    row.folded_paths = frozenset(e.path for e in report.folded)
    parity = bnfold.compare(model, result.module, check_batches or [inputs], batch_independence=False,
                            localize=False)
    row.parity = parity.passed
    return row


class Out(nn.Module):
    """A transformers model's one tensor output (``logits`` / ``last_hidden_state``): plain tensors for fold and
    parity."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.m, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.m(x), self.key)


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _decoder(config: str, model: str) -> tuple[nn.Module, torch.Tensor]:
    """A 2-layer transformers decoder (``config``/``model`` class names) with its LM head tied to the input
    embedding."""
    import transformers

    cfg = getattr(transformers, config)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(0)
    return Out(randomize_norms(getattr(transformers, model)(cfg)), "logits"), _ids()


def llama() -> tuple[nn.Module, torch.Tensor]:
    """A 2-layer Llama decoder with its LM head tied to the input embedding."""
    return _decoder("LlamaConfig", "LlamaForCausalLM")


def qwen2() -> tuple[nn.Module, torch.Tensor]:
    return _decoder("Qwen2Config", "Qwen2ForCausalLM")


def gemma() -> tuple[nn.Module, torch.Tensor]:
    """Gemma: its RMSNorm scales by ``1 + weight`` and casts after the multiply (``(x * (1 + w)).type_as(x)``)."""
    return _decoder("GemmaConfig", "GemmaForCausalLM")


def bert() -> tuple[nn.Module, torch.Tensor]:
    import transformers

    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return Out(randomize_norms(transformers.BertModel(cfg, add_pooling_layer=False)), "last_hidden_state"), _ids()


def vit() -> tuple[nn.Module, torch.Tensor]:
    import transformers

    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = Out(randomize_norms(transformers.ViTModel(cfg, add_pooling_layer=False)), "last_hidden_state")
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def gpt2() -> tuple[nn.Module, torch.Tensor]:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return Out(randomize_norms(transformers.GPT2LMHeadModel(cfg)), "logits"), _ids()


HF: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "hf_llama": llama, "hf_qwen2": qwen2, "hf_gemma": gemma, "hf_bert": bert, "hf_vit": vit, "hf_gpt2": gpt2}
"""Small transformers models (random init, random norm affines) and an example input each."""


def hf_models() -> dict[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]]:
    """:data:`HF` with the input as a tuple (what :func:`fold_row` takes)."""
    def wrap(build: Callable[[], tuple[nn.Module, torch.Tensor]]) -> Callable[[], tuple[nn.Module, tuple[Any, ...]]]:
        def make() -> tuple[nn.Module, tuple[Any, ...]]:
            model, x = build()
            return model, (x,)
        return make
    return {name: wrap(build) for name, build in HF.items()}
