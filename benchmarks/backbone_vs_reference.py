"""Forward+backward time of our DINOv2 backbone against timm's VisionTransformer, same weights.

timm's ViT is a widely used, well-tuned implementation of the same architecture (patch
embedding, [CLS] + learned position embedding, pre-norm blocks with LayerScale, final norm),
so it tells whether our backbone pays for its DINOv2 compatibility and its token streams.
Our weights are copied into timm's model through an explicit key mapping and the outputs
are checked to agree before anything is timed, so both run the same function. The two
models run alternately; the ratio is the median of the per-round ratios (ours / timm).

    python benchmarks/backbone_vs_reference.py [--model vits14] [--batch 16] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from dinospec.config import ModelConfig, SpecializeConfig, load_config
from dinospec.models import DinoVisionTransformer, build_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
# The key mapping ours -> timm: DINOv2's names (ours) and timm's coincide for everything the
# two share (`to_timm_state` checks it key by key); iBOT's mask token has no counterpart.
OURS_ONLY = {"mask_token"}
TOLERANCE = 1e-5


def timm_twin(config: ModelConfig) -> VisionTransformer:
    """timm's ViT with our architecture: no registers, final norm, no classifier."""
    unsupported = config.num_register_tokens or config.ffn_layer != "mlp"
    if unsupported or config.specialize != SpecializeConfig():
        raise SystemExit("the timm comparison covers vanilla ViTs with an MLP and no registers")
    return VisionTransformer(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=0,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        proj_bias=config.proj_bias,
        init_values=config.init_values,
    )


def to_timm_state(ours: dict[str, Tensor], timm_keys: set[str]) -> dict[str, Tensor]:
    """Our state dict under timm's names; any key left over on either side is an error,
    so a silently unmapped weight cannot make the comparison run different functions."""
    mapped = {k: v for k, v in ours.items() if k not in OURS_ONLY}
    if mapped.keys() != timm_keys:
        raise SystemExit(
            f"key mapping incomplete: only ours {sorted(mapped.keys() - timm_keys)}, "
            f"only timm {sorted(timm_keys - mapped.keys())}"
        )
    return mapped


def ours_tokens(model: DinoVisionTransformer, images: Tensor) -> Tensor:
    out = model.forward_features(images)
    return torch.cat([out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]], dim=1)


def timm_tokens(model: VisionTransformer, images: Tensor) -> Tensor:
    return model.forward_features(images)


def ours_loss(model: DinoVisionTransformer, images: Tensor) -> Tensor:
    """From DINOv2's output dict as a training loss would read it (no re-joining of the
    [CLS] and patch tokens, which would cost ours a copy that timm does not make)."""
    out = model.forward_features(images)
    return out["x_norm_clstoken"].sum() + out["x_norm_patchtokens"].mean()


def timm_loss(model: VisionTransformer, images: Tensor) -> Tensor:
    out = model.forward_features(images)
    return out[:, 0].sum() + out[:, 1:].mean()


def verify_same_function(
    ours: DinoVisionTransformer, reference: VisionTransformer, images: Tensor
) -> float:
    """Largest difference of the final tokens and of the parameter gradients (relative to
    the largest gradient of each parameter); stops the run above TOLERANCE."""
    a, b = ours_tokens(ours, images), timm_tokens(reference, images)
    errors = {"tokens": float((a - b).detach().abs().max())}
    a.square().mean().backward()
    b.square().mean().backward()
    timm_params = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        if name in OURS_ONLY:
            continue
        q = timm_params[name]
        scale = float(q.grad.abs().max()) or 1.0
        errors[name] = float((p.grad - q.grad).abs().max()) / scale
    worst = max(errors, key=errors.get)
    if errors[worst] > TOLERANCE:
        raise SystemExit(
            f"our backbone and timm's differ: {worst} by {errors[worst]:.2e} > {TOLERANCE}"
        )
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    return errors[worst]


def step_seconds(loss: Callable[[], Tensor], sync: bool) -> float:
    start = time.perf_counter()
    loss().backward()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vits14", help="a vanilla file in configs/models")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast")
    args = parser.parse_args()

    config = load_config(CONFIGS / f"{args.model}.yaml").model
    config = replace(config, img_size=args.img_size, drop_path_rate=0.0)
    torch.manual_seed(0)
    ours = build_backbone(config)
    for module in ours.modules():  # LayerScale starts at 1e-5: make every block count
        if hasattr(module, "gamma"):
            nn.init.uniform_(module.gamma, 0.5, 1.0)
    reference = timm_twin(config)
    reference.load_state_dict(to_timm_state(ours.state_dict(), set(reference.state_dict())))
    ours.to(args.device).train()
    reference.to(args.device).train()
    check = torch.randn(2, 3, args.img_size, args.img_size, device=args.device)
    error = verify_same_function(ours, reference, check)

    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    autocast = (
        torch.autocast(torch.device(args.device).type, torch.bfloat16)
        if args.dtype == "bf16"
        else contextlib.nullcontext()
    )
    models: dict[str, tuple[nn.Module, Callable[[], Tensor]]] = {
        "ours": (ours, lambda: ours_loss(ours, images)),
        "timm": (reference, lambda: timm_loss(reference, images)),
    }
    sync = images.is_cuda
    times: dict[str, list[float]] = {name: [] for name in models}
    with autocast:
        for model, loss in models.values():
            step_seconds(loss, sync)
            model.zero_grad(set_to_none=True)
        for _ in range(args.rounds):
            for name, (model, loss) in models.items():
                times[name].append(step_seconds(loss, sync))
                model.zero_grad(set_to_none=True)
    ratios = [o / t for o, t in zip(times["ours"], times["timm"], strict=True)]

    print(
        f"{args.model} (vanilla), batch {args.batch} x {args.img_size}px, fwd+bwd, {args.dtype}, "
        f"{args.rounds} alternating rounds, {args.device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, timm {timm.__version__}"
    )
    print(f"same weights; largest difference (tokens, relative grads): {error:.1e}")
    print(f"{'model':<8}{'median s':>10}{'min s':>10}{'max s':>10}{'img/s':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:<8}{median:>10.3f}{min(values):>10.3f}{max(values):>10.3f}"
            f"{args.batch / median:>10.1f}"
        )
    print(f"ours / timm, median of per-round ratios: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
