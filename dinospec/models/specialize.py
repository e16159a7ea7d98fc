"""Which sublayers of which blocks are specialized: a `SpecializeConfig` resolved for a
model of a given depth (the sublayer classes are in dinospec.models.sublayers)."""

from __future__ import annotations

from dataclasses import dataclass

from dinospec.config import BLOCK_SUBLAYERS, SpecializeConfig, resolve_blocks


@dataclass(frozen=True)
class SpecializationPlan:
    """Per block, the names (from BLOCK_SUBLAYERS) of its specialized sublayers."""

    per_block: tuple[frozenset[str], ...]
    final_norm: bool
    tokens: str

    @classmethod
    def build(cls, spec: SpecializeConfig | None, depth: int) -> SpecializationPlan:
        if spec is None:
            spec = SpecializeConfig()
        per_block: list[set[str]] = [set() for _ in range(depth)]
        for sublayer in BLOCK_SUBLAYERS:
            key = f"{sublayer}_blocks"
            value = getattr(spec, key)
            try:
                blocks = resolve_blocks(value, depth)
            except ValueError as err:
                raise ValueError(f"specialize.{key}={value!r}: {err}") from err
            for i in blocks:
                per_block[i].add(sublayer)
        return cls(tuple(frozenset(s) for s in per_block), bool(spec.final_norm), spec.tokens)

    @property
    def is_vanilla(self) -> bool:
        return not self.final_norm and not any(self.per_block)

    def num_prefix_path_tokens(self, num_register_tokens: int) -> int:
        """How many leading tokens take the prefix path of a specialized model: [CLS] and
        the registers, or [CLS] alone (`specialize.tokens`)."""
        return 1 + num_register_tokens if self.tokens == "cls+registers" else 1
