"""Step time and peak memory of dinospec's training step against DINOv2's own, same
weights and same batch.

The peer is DINOv2's `SSLMetaArch` training step run from the unchanged reference code in
../shared/reference/dinov2 (see benchmarks/dinov2_reference.py for how it is imported):
`apply_optim_scheduler`, `zero_grad`, `forward_backward` (teacher, student on all crops,
DINO + iBOT + KoLeo, backward), gradient clipping, AdamW built by DINOv2's
`build_optimizer` from its own parameter groups, and `update_teacher`. dinospec's step is
`Trainer.step` (after `apply_schedule_values`, as its loop does), vanilla and with the
paper's specialization (configs/models/specialization/paper.yaml), the specialized model
converted from the vanilla one so that all three compute the same function.

Stand-ins for what cannot run here (details in dinov2_reference.py): a no-op `dinov2.fsdp`
(identity wrapper, no resharding, `get_fsdp_modules` giving plain parameter lists), an
`xformers.ops.fmha.BlockDiagonalMask` that concatenates and splits the student head's
inputs, `XFORMERS_DISABLED=1` (PyTorch attention), the student's multi-crop call run per
crop size instead of xFormers' block-diagonal pass, `.cuda()` holders for the batch, the
FSDP stream synchronization skipped, `build_optimizer` and `apply_optim_scheduler`
compiled out of train.py unchanged, FSDP's `clip_grad_norm_` replaced by torch's function
per student part, and, for the tests' tiny ViT only, a width DINOv2 does not name.

Same weights and batch: DINOv2's model is built (its initialization; LayerScale raised to
U(0.5, 1) so that every block counts in the checks) and its student's state dict is loaded
into dinospec's student and teacher; the key mapping is the identity (dinospec keeps
DINOv2's names) and is checked key by key and shape by shape, the specialized model's
prefix parameters being copies of the shared ones. The batch is made by DINOv2's
`collate_data_and_cast` with its `MaskingGenerator` from random crops and handed to
dinospec unchanged (its collate produces the same keys and layout, checked).

Agreement, before anything is timed, in float32 without stochastic depth (off in the timed
steps too, so what is timed is what was checked, on twins built the same way): the four
weighted loss terms (DINO global and local, iBOT, KoLeo) of one forward/backward must agree
within LOSS_TOLERANCE (relative), and every parameter's gradient within GRAD_TOLERANCE of
that parameter's largest gradient (a specialized parameter pair is compared through the sum
of its two gradients, which is the gradient of the shared weight it was copied from). Then
one whole step of the reference and of vanilla dinospec from the same state: the update of
each student and teacher parameter (parameter groups, learning-rate and weight-decay
multipliers, clipping, AdamW, EMA) is compared with UPDATE_TOLERANCE of its largest update,
and each parameter beyond it is printed as a WARNING: this last check reports, it does not
stop the run, so that a deliberate departure from DINOv2's optimizer can still be timed.

Timing: contenders step in turn, the order rotating each round; ratios are medians of the
per-round ratios (dinospec / reference). "Peak memory" is, on CUDA, the allocator's peak
during one step (`torch.cuda.max_memory_allocated`) minus what the other contenders in the
process hold; on a CPU, the peak of bytes held by live tensor storages during one step as
the dispatcher sees them: weights, gradients, optimizer state, buffers and the batch held
at the start, plus every tensor made during the step until it is freed (memory inside a
single kernel and allocator caching are not counted). Measured in a separate, untimed
step, because the CPU count tracks every operator.

    python benchmarks/vs_dinov2.py                      # small and full configuration, ViT-S
    python benchmarks/vs_dinov2.py --configs full --batch-sizes 8,16 --local-crops 4,8
    python benchmarks/vs_dinov2.py --configs full --profile 15   # and top operators
    python benchmarks/vs_dinov2.py --size tiny --rounds 1        # the tests' tiny run
    python benchmarks/vs_dinov2.py --multi-crop-attention one_pass  # dinospec in one pass
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import tempfile
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dinov2_reference as ref
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dinospec.config import Config, load_config
from dinospec.losses.ibot import masked_patch_weights
from dinospec.models.convert import fill_prefix_path
from dinospec.train.data import to_device
from dinospec.train.loop import Trainer, schedules_for
from dinospec.train.optim import apply_schedule_values

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
UPDATE_TOLERANCE = 5e-4  # a weight-decay slip on a 0.02-scale weight shows as 2e-3
ADAM_SENSITIVE = 1e-6  # 100 x AdamW's eps; see compare_updates
BATCH_KEYS = (
    "collated_global_crops",
    "collated_local_crops",
    "collated_masks",
    "mask_indices_list",
    "masks_weight",
    "upperbound",
    "n_masked_patches",
)
TINY_MODEL = (
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
    "ibot.head_hidden_dim=64",
    "ibot.head_bottleneck_dim=32",
)
CONTENDERS = ("reference", "vanilla", "specialized")


@dataclass(frozen=True)
class Setting:
    """Crops and prototypes of one configuration."""

    global_size: int
    local_size: int
    local_crops: int
    prototypes: int


CONFIGURATIONS = {
    "small": Setting(112, 56, 4, 4096),
    "full": Setting(224, 98, 8, 65536),
    "tiny": Setting(56, 28, 2, 256),
}


@dataclass
class Row:
    """One table row: a configuration at one batch size and local-crop count."""

    config: str
    setting: Setting
    batch: int
    times: dict[str, list[float]] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)


def dinospec_config(
    args: argparse.Namespace, setting: Setting, batch: int, specialized: bool, dtype: str
) -> Config:
    """DINOv2's ImageNet-1k recipe for the model size, at this configuration, without
    stochastic depth (its random draws could not be matched between the two codes). The
    position embedding is sized for the global crops, as DINOv2 builds its model
    (`build_model_from_cfg` passes `crops.global_crops_size`); dinospec's recipes keep
    `model.img_size` at 224 whatever the crops."""
    size = "s" if args.size == "tiny" else args.size
    recipe = CONFIGS / f"vit{size}14_in1k{'_spec' if specialized else ''}.yaml"
    overrides = [
        "data.dataset=synthetic",
        f"data.synthetic_size={batch}",
        "data.num_workers=0",
        f"crops.global_crops_size={setting.global_size}",
        f"crops.local_crops_size={setting.local_size}",
        f"crops.local_crops_number={setting.local_crops}",
        f"dino.head_n_prototypes={setting.prototypes}",
        f"ibot.head_n_prototypes={setting.prototypes}",
        f"train.batch_size_per_gpu={batch}",
        f"train.compile={args.compile}",
        f"train.precision={dtype}",
        f"train.output_dir={args.run_dir}",
        "model.drop_path_rate=0.0",
        f"model.img_size={setting.global_size}",
        f"model.multi_crop_attention={args.multi_crop_attention}",
    ]
    if args.size == "tiny":
        overrides += TINY_MODEL
    return load_config(recipe, overrides)


def initial_weights(reference: ref.Reference, cfg: Any) -> dict[str, Tensor]:
    """DINOv2's initial student weights, LayerScale raised so every block counts."""
    torch.manual_seed(0)
    model = ref.build_meta_arch(reference, cfg, torch.device("cpu"))
    for name, param in model.student.named_parameters():
        if name.endswith(".gamma"):
            nn.init.uniform_(param.detach(), 0.5, 1.0)
    return {k: v.detach().clone() for k, v in model.student.state_dict().items()}


def collated_batch(
    reference: ref.Reference, config: Config, batch: int, device: torch.device
) -> dict[str, Any]:
    """One batch from DINOv2's collate and masking, in dinospec's layout, on `device`."""
    generator = torch.Generator().manual_seed(0)
    random.seed(0)
    c, grid = config.crops, config.crops.global_crops_size // config.model.patch_size

    def crops(size: int, n: int) -> list[Tensor]:
        return [torch.randn(3, size, size, generator=generator) for _ in range(n)]

    samples = [
        (
            {
                "global_crops": crops(c.global_crops_size, 2),
                "local_crops": crops(c.local_crops_size, c.local_crops_number),
            },
            (),
        )
        for _ in range(batch)
    ]
    collated = reference.collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(config.ibot.mask_ratio_min_max),
        mask_probability=config.ibot.mask_sample_probability,
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=reference.MaskingGenerator(
            input_size=(grid, grid), max_num_patches=0.5 * grid * grid
        ),
    )
    return to_device(dinospec_layout(collated), device)


def dinospec_layout(collated: dict[str, Any]) -> dict[str, Any]:
    """DINOv2's batch as dinospec's collate makes it: the same keys, crop-major crops and
    per-patch mask weights; checked rather than assumed."""
    if set(collated) != set(BATCH_KEYS):
        raise SystemExit(f"DINOv2's batch keys {sorted(collated)} are not {sorted(BATCH_KEYS)}")
    if not torch.equal(collated["masks_weight"], masked_patch_weights(collated["collated_masks"])):
        raise SystemExit("DINOv2's masks_weight differs from dinospec's for the same masks")
    return dict(collated)


def mapped_weights(weights: dict[str, Tensor], student: nn.ModuleDict) -> dict[str, Tensor]:
    """DINOv2's student state dict under dinospec's keys (the same names), every key and
    shape checked; a specialized model's prefix parameters are copies of the shared ones."""
    target = student.state_dict()
    shared = {k for k in target if ".prefix_" not in k}
    if shared != weights.keys():
        raise SystemExit(
            f"key mapping incomplete: only dinospec {sorted(shared - weights.keys())}, "
            f"only DINOv2 {sorted(weights.keys() - shared)}"
        )
    wrong = [k for k in shared if target[k].shape != weights[k].shape]
    if wrong:
        raise SystemExit(
            f"shapes differ: {[(k, target[k].shape, weights[k].shape) for k in wrong]}"
        )
    backbone = {
        k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")
    }
    filled = fill_prefix_path(backbone, student.backbone)
    heads = {k: v for k, v in weights.items() if not k.startswith("backbone.")}
    return heads | {f"backbone.{k}": v for k, v in filled.items()}


def shared_name(name: str) -> str:
    """The DINOv2 parameter a dinospec parameter was copied from."""
    return name.replace(".prefix_", ".")


class ReferenceContender:
    """DINOv2's SSLMetaArch, its optimizer and the batch behind `.cuda()` holders."""

    def __init__(
        self,
        reference: ref.Reference,
        cfg: Any,
        weights: dict[str, Tensor],
        batch: dict[str, Any],
        values: dict[str, float],
        dtype: str,
    ) -> None:
        """bf16 runs `forward_backward` under autocast, standing in for the fp16 mixed
        precision that DINOv2 gets from FSDP."""
        self.reference, self.cfg, self.values = reference, cfg, values
        device = batch["collated_global_crops"].device
        self.model = ref.build_meta_arch(reference, cfg, device)
        self.model.student.load_state_dict(weights, strict=True)
        self.model.teacher.load_state_dict(weights, strict=True)
        self.optimizer = reference.build_optimizer(cfg, self.model.get_params_groups())
        self.batch = ref.reference_batch(batch)
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16")

    def step(self) -> dict[str, float]:
        with self.autocast:
            losses = ref.reference_step(
                self.reference,
                self.model,
                self.optimizer,
                self.batch,
                self.values,
                self.cfg.optim.clip_grad,
            )
        return ref.weighted_terms(losses, self.cfg)

    def forward_backward(self) -> dict[str, float]:
        losses = self.model.forward_backward(self.batch, teacher_temp=self.values["teacher_temp"])
        return ref.weighted_terms({k: v.item() for k, v in losses.items()}, self.cfg)

    def grads(self) -> dict[str, Tensor]:
        return {n: p.grad for n, p in self.model.student.named_parameters()}

    def parts(self) -> dict[str, nn.Module]:
        return {"student": self.model.student, "teacher": self.model.teacher}

    def held(self) -> list[Tensor]:
        return held_tensors(self.model, self.optimizer, self.batch_tensors())

    def batch_tensors(self) -> list[Tensor]:
        return [v.tensor for v in self.batch.values() if isinstance(v, ref.OnDevice)]


class DinospecContender:
    """dinospec's Trainer with DINOv2's weights loaded into student and teacher."""

    def __init__(
        self,
        config: Config,
        weights: dict[str, Tensor],
        batch: dict[str, Any],
        values: dict[str, float],
    ) -> None:
        self.trainer = Trainer(config, batch["collated_global_crops"].device.type)
        model = self.trainer.model
        state = mapped_weights(weights, model.student)
        model.student.load_state_dict(state, strict=True)
        model.teacher.load_state_dict(state, strict=True)
        self.batch, self.values = batch, values

    def step(self) -> dict[str, float]:
        apply_schedule_values(self.trainer.optimizer, self.values)
        result = self.trainer.step(self.batch, self.values)
        if result.nonfinite:
            raise RuntimeError(f"non-finite loss terms {result.nonfinite} in the benchmark step")
        return result.losses

    def forward_backward(self) -> dict[str, float]:
        """The forward and backward passes of `Trainer.step`, without the update."""
        model = self.trainer.model
        targets = model.teacher_targets(self.batch, self.values["teacher_temp"])
        terms, _ = model.losses(self.batch, targets)
        sum(terms.values()).backward()
        return {k: float(v.detach()) for k, v in terms.items()}

    def grads(self) -> dict[str, Tensor]:
        """Gradients per DINOv2 parameter: a prefix copy's gradient adds to its source's."""
        grads: dict[str, Tensor] = {}
        for name, p in self.trainer.model.student.named_parameters():
            key = shared_name(name)
            grads[key] = p.grad if key not in grads else grads[key] + p.grad
        return grads

    def parts(self) -> dict[str, nn.Module]:
        return {"student": self.trainer.model.student, "teacher": self.trainer.model.teacher}

    def held(self) -> list[Tensor]:
        batch = [v for v in self.batch.values() if isinstance(v, Tensor)]
        return held_tensors(self.trainer.model, self.trainer.optimizer, batch)


Contender = ReferenceContender | DinospecContender


def held_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, extra: Iterable[Tensor]
) -> list[Tensor]:
    """What a contender holds between steps: weights, buffers, gradients, optimizer state
    (and the batch, which the contenders share)."""
    tensors = [*model.parameters(), *model.buffers(), *extra]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, Tensor)]
    return tensors


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by live tensor storages, and their peak, while operators run under it.

    Storages are counted once however many views share them, from the operator that made
    them until they are freed (a finalizer on the storage, which torch keeps alive exactly
    as long as its data). Tensors held when it starts are counted from the start.
    """

    def __init__(self, held: Iterable[Tensor]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        for tensor in held:
            self._track(tensor)

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._sizes:
            return
        self._sizes[ptr] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr, 0)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self._track(leaf)
        return out


def peak_bytes(contender: Contender, others: list[Contender], device: torch.device) -> int:
    """Peak memory of one step (see the module docstring for what it counts)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        contender.step()
        torch.cuda.synchronize(device)
        held_by_others = storage_bytes(t for o in others for t in o.held())
        return torch.cuda.max_memory_allocated(device) - held_by_others
    with LiveTensorBytes(contender.held()) as tracker:
        contender.step()
    return tracker.peak


def step_seconds(contender: Contender, device: torch.device) -> float:
    start = time.perf_counter()
    contender.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare_losses(ours: dict[str, float], theirs: dict[str, float], label: str) -> str:
    """Stops the run if a loss term differs beyond LOSS_TOLERANCE; else its largest gap."""
    if ours.keys() != theirs.keys():
        raise SystemExit(f"{label}: loss terms {sorted(ours)} vs DINOv2's {sorted(theirs)}")
    gaps = {k: relative_difference(ours[k], theirs[k]) for k in theirs}
    worst = max(gaps, key=gaps.__getitem__)
    values = ", ".join(f"{k} {ours[k]:.6f}/{theirs[k]:.6f}" for k in sorted(theirs))
    if gaps[worst] > LOSS_TOLERANCE:
        raise SystemExit(
            f"{label}: loss term {worst} differs from DINOv2's by {gaps[worst]:.2e} relative "
            f"> {LOSS_TOLERANCE} (dinospec/DINOv2: {values})"
        )
    return f"{label} losses ({values}): max relative difference {gaps[worst]:.1e} ({worst})"


def compare_grads(ours: dict[str, Tensor], theirs: dict[str, Tensor], label: str) -> str:
    """Stops the run if any gradient differs beyond GRAD_TOLERANCE of that parameter's
    largest gradient; else reports the largest such difference."""
    if ours.keys() != theirs.keys():
        raise SystemExit(f"{label}: parameters differ: {sorted(ours.keys() ^ theirs.keys())}")
    gaps = {}
    for name, g in theirs.items():
        scale = float(g.abs().max()) or 1.0
        gaps[name] = float((ours[name].float() - g.float()).abs().max()) / scale
    worst = max(gaps, key=gaps.__getitem__)
    if gaps[worst] > GRAD_TOLERANCE:
        bad = sorted((n for n in gaps if gaps[n] > GRAD_TOLERANCE), key=gaps.__getitem__)
        raise SystemExit(
            f"{label}: gradients differ from DINOv2's beyond {GRAD_TOLERANCE} in "
            f"{len(bad)} parameters, worst {worst} by {gaps[worst]:.2e}: {bad[-8:]}"
        )
    return f"{label} gradients: max relative difference {gaps[worst]:.1e} ({worst})"


def snapshot(contender: Contender) -> dict[str, Tensor]:
    return {
        f"{part}.{name}": p.detach().clone()
        for part, module in contender.parts().items()
        for name, p in module.named_parameters()
    }


def compare_updates(
    before: dict[str, Tensor],
    ours: dict[str, Tensor],
    theirs: dict[str, Tensor],
    grads: dict[str, Tensor],
) -> list[str]:
    """The largest difference between the two updates (after - before) relative to each
    parameter's largest update, and each parameter beyond UPDATE_TOLERANCE.

    Elements whose gradient is under ADAM_SENSITIVE are left out: on a first AdamW step the
    update is lr * g / (|g| + eps), so where |g| is near eps (1e-8) the float rounding of
    the gradient (1e-10 here, against gradients up to 1e-2) moves the update by percents.
    Differences up to two float32 ulps of the parameter are rounding of the new value
    itself and are not counted: the teacher's update is (1 - momentum) times the student's,
    small enough next to the weight (0.008 x 3e-4 against 0.02) that one ulp of the
    weight is about 1e-3 of it.
    """
    gaps, skipped, total = {}, 0, 0
    for name, start in before.items():
        counted = grads[name.split(".", 1)[1]].abs() >= ADAM_SENSITIVE
        skipped += int((~counted).sum())
        total += counted.numel()
        step = (theirs[name] - start)[counted]
        ulps = 2 * torch.finfo(start.dtype).eps * start[counted].abs()
        gap = ((ours[name] - theirs[name])[counted].abs() - ulps).clamp(min=0)
        gaps[name] = float(gap.abs().max()) / float(step.abs().max()) if step.numel() else 0.0
    worst = max(gaps, key=gaps.__getitem__)
    lines = [
        f"one whole step (clip, AdamW, EMA): updates of student and teacher: max relative "
        f"difference {gaps[worst]:.1e} ({worst}); {skipped} of {total} elements with "
        f"|gradient| < {ADAM_SENSITIVE:g} left out"
    ]
    lines += [
        f"WARNING: the update of {name} differs from DINOv2's by {gaps[name]:.1e}"
        for name in sorted(n for n in gaps if gaps[n] > UPDATE_TOLERANCE)
    ]
    return lines


class Run:
    """What every contender of one row is built from: the reference, configs, weights,
    batch and schedule values."""

    def __init__(
        self,
        args: argparse.Namespace,
        reference: ref.Reference,
        setting: Setting,
        batch: int,
    ) -> None:
        self.args, self.reference, self.device = args, reference, torch.device(args.device)
        self.setting, self.n_images = setting, batch
        vanilla = dinospec_config(args, setting, batch, False, "fp32")
        self.cfg = ref.reference_config(reference, vanilla)
        self.weights = initial_weights(reference, self.cfg)
        self.batch = collated_batch(reference, vanilla, batch, self.device)
        after_warmup = vanilla.optim.warmup_epochs * vanilla.train.epoch_length
        self.values = schedules_for(vanilla, batch).at(after_warmup)

    def build(self, name: str, dtype: str) -> Contender:
        if name == "reference":
            return ReferenceContender(
                self.reference, self.cfg, self.weights, self.batch, self.values, dtype
            )
        config = dinospec_config(self.args, self.setting, self.n_images, name != "vanilla", dtype)
        return DinospecContender(config, self.weights, self.batch, self.values)

    def build_all(self, dtype: str) -> dict[str, Contender]:
        return {name: self.build(name, dtype) for name in CONTENDERS}


def check_agreement(run: Run) -> None:
    """Losses and gradients of one forward/backward, then one whole step (see the module
    docstring); float32, fresh contenders built from the same weights."""
    contenders = run.build_all("fp32")
    terms = {name: c.forward_backward() for name, c in contenders.items()}
    grads = {name: c.grads() for name, c in contenders.items()}
    for name in CONTENDERS[1:]:
        print(compare_losses(terms[name], terms["reference"], name), flush=True)
        print(compare_grads(grads[name], grads["reference"], name), flush=True)
    del contenders, grads
    pair = {name: run.build(name, "fp32") for name in CONTENDERS[:2]}
    before = snapshot(pair["reference"])
    losses = {name: c.step() for name, c in pair.items()}
    print(compare_losses(losses["vanilla"], losses["reference"], "vanilla Trainer.step"))
    after = {name: snapshot(c) for name, c in pair.items()}
    grads = pair["reference"].grads()
    for line in compare_updates(before, after["vanilla"], after["reference"], grads):
        print(line, flush=True)


def measure_row(run: Run, row: Row, dtype: str, rounds: int, warmup: int) -> dict[str, Contender]:
    """Warm-up steps, then `rounds` rounds of one step per contender, the order rotating,
    then each contender's peak memory in one more step. Returns the contenders, which may
    still be profiled."""
    contenders = run.build_all(dtype)
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name].step()
    row.times = {name: [] for name in names}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            row.times[name].append(step_seconds(contenders[name], run.device))
        times = ", ".join(f"{n} {row.times[n][-1]:.3f} s" for n in names)
        print(f"[{row.config} batch {row.batch}] round {i + 1}/{rounds}: {times}", flush=True)
    for name, contender in contenders.items():
        others = [c for n, c in contenders.items() if n != name]
        row.peaks[name] = peak_bytes(contender, others, run.device)
    return contenders


def operator_times(contender: Contender, device: torch.device) -> dict[str, tuple[float, int]]:
    """Self time (ms) and calls of each operator in one step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        contender.step()
    clock = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {e.key: (getattr(e, clock) / 1000, e.count) for e in profiler.key_averages()}


def print_profile(contenders: dict[str, Contender], device: torch.device, rows: int) -> None:
    """Each contender's top operators by self time, then the operators whose time differs
    most between each dinospec variant and the reference."""
    profiles = {name: operator_times(c, device) for name, c in contenders.items()}
    for name, ops in profiles.items():
        total = sum(ms for ms, _ in ops.values())
        print(f"{name}: top {rows} operators by self time (one step, {total:.0f} ms in all)")
        for op, (ms, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:rows]:
            print(f"  {op:<48}{ms:>10.1f} ms{calls:>8} calls")
    reference = profiles["reference"]
    for name in CONTENDERS[1:]:
        ops = profiles[name]
        keys = reference.keys() | ops.keys()

        def diff(op: str, ops: dict = ops) -> float:
            return ops.get(op, (0.0, 0))[0] - reference.get(op, (0.0, 0))[0]

        print(f"{name} - reference: the {rows} operators whose self time differs most")
        print(f"  {'operator':<48}{'reference ms':>14}{name + ' ms':>16}{'diff ms':>10}")
        for op in sorted(keys, key=lambda k: -abs(diff(k)))[:rows]:
            theirs, ours = reference.get(op, (0.0, 0)), ops.get(op, (0.0, 0))
            print(
                f"  {op:<48}{theirs[0]:>9.1f} ({theirs[1]:>3}){ours[0]:>11.1f} ({ours[1]:>3})"
                f"{diff(op):>10.1f}"
            )


def median_ratio(row: Row, ours: str, theirs: str) -> float:
    return statistics.median(a / b for a, b in zip(row.times[ours], row.times[theirs], strict=True))


def print_table(rows: list[Row], args: argparse.Namespace, dtype: str) -> None:
    print(
        f"\nDINOv2 training step, dinospec / reference: ViT-{args.size.upper()}/14, "
        f"{args.device} ({device_name(args.device)}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {dtype}, compile={args.compile}, "
        f"dinospec multi-crop={args.multi_crop_attention}, "
        f"{args.rounds} rotating rounds after {args.warmup} warm-up step(s)"
    )
    header = (
        f"{'config':<7}{'crops':<18}{'protos':>7}{'batch':>6}{'ref s':>8}{'van s':>8}"
        f"{'spec s':>8}{'van/ref':>8}{'spec/ref':>9}{'spec/van':>9}"
        f"{'ref MiB':>9}{'van MiB':>9}{'spec MiB':>9}{'van/ref':>8}{'spec/ref':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        s = r.setting
        crops = f"2x{s.global_size}+{s.local_crops}x{s.local_size}"
        med = {n: statistics.median(r.times[n]) for n in CONTENDERS}
        mib = {n: r.peaks[n] / 2**20 for n in CONTENDERS}
        print(
            f"{r.config:<7}{crops:<18}{s.prototypes:>7}{r.batch:>6}"
            + "".join(f"{med[n]:>8.3f}" for n in CONTENDERS)
            + f"{median_ratio(r, 'vanilla', 'reference'):>8.3f}"
            + f"{median_ratio(r, 'specialized', 'reference'):>9.3f}"
            + f"{median_ratio(r, 'specialized', 'vanilla'):>9.3f}"
            + "".join(f"{mib[n]:>9.0f}" for n in CONTENDERS)
            + f"{mib['vanilla'] / mib['reference']:>8.3f}"
            + f"{mib['specialized'] / mib['reference']:>9.3f}"
        )
    print(
        "s: median step time; time ratios: medians of per-round ratios; MiB: peak memory of "
        "one step (CUDA: allocator peak; CPU: live tensor storages, see the docstring)"
    )
    for r in rows:
        if r.config == "full":
            print_targets(r)


def print_targets(row: Row) -> None:
    """Issue 19's targets for the full configuration."""
    checks = [
        (f"{n}/ref time <= 1.00", median_ratio(row, n, "reference"), 1.00) for n in CONTENDERS[1:]
    ]
    checks += [
        (f"{n}/ref peak <= 0.95", row.peaks[n] / row.peaks["reference"], 0.95)
        for n in CONTENDERS[1:]
    ]
    checks.append(("spec/van time <= 1.02", median_ratio(row, "specialized", "vanilla"), 1.02))
    verdicts = [
        f"{label}: {v:.3f} {'met' if v <= limit else 'MISSED'}" for label, v, limit in checks
    ]
    print(f"targets (full, batch {row.batch}): " + "; ".join(verdicts))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="s", choices=["tiny", "s", "b", "l"])
    parser.add_argument("--configs", default="small,full", help="small, full (tiny: --size)")
    parser.add_argument("--batch-sizes", type=parse_ints, default=[8], help="e.g. 8,16")
    parser.add_argument(
        "--local-crops", type=parse_ints, default=[], help="e.g. 4,8 (default: the config's)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", default="off", choices=["off", "on"], help="dinospec's")
    parser.add_argument(
        "--multi-crop-attention",
        default="per_crop",
        choices=["per_crop", "one_pass"],
        help="dinospec's student: crop sizes one after the other, or one sequence",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="top N operators")
    parser.add_argument("--reference", type=Path, default=ref.DEFAULT_ROOT)
    args = parser.parse_args()
    if 0 in args.local_crops:
        parser.error("--local-crops: DINOv2's collate cannot stack zero local crops")
    if args.size == "tiny":
        args.configs = "tiny"
    return args


def rows_to_run(args: argparse.Namespace) -> list[Row]:
    rows = []
    for config in args.configs.split(","):
        setting = CONFIGURATIONS[config.strip()]
        for n_local in args.local_crops or [setting.local_crops]:
            for batch in args.batch_sizes:
                rows.append(Row(config.strip(), replace(setting, local_crops=n_local), batch))
    return rows


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if args.device == "cuda" else "fp32")
    reference = ref.load_reference(args.reference)
    rows = rows_to_run(args)
    checked: set[str] = set()
    with tempfile.TemporaryDirectory() as run_dir:
        args.run_dir = run_dir
        for row in rows:
            run = Run(args, reference, row.setting, row.batch)
            label = f"{row.config} 2x{row.setting.global_size}+{row.setting.local_crops}x"
            print(f"== {label}{row.setting.local_size}, batch {row.batch}", flush=True)
            if row.config not in checked:
                check_agreement(run)
                checked.add(row.config)
                gc.collect()
            contenders = measure_row(run, row, dtype, args.rounds, args.warmup)
            if args.profile and row is rows_for(rows, row.config)[0]:
                print_profile(contenders, run.device, args.profile)
            del contenders
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, args, dtype)


def rows_for(rows: list[Row], config: str) -> list[Row]:
    return [r for r in rows if r.config == config]


if __name__ == "__main__":
    main()
