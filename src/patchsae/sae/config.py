"""The SAE's configuration: which architecture (one type each, see `patchsae.sae.model.VARIANTS`) and its
hyper-parameters. Checkpoints store it as JSON (`to_json`), so field names are part of the file format."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from patchsae import PatchSAEError

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
TOPK_FAMILY = ("topk", "batchtopk")
OBJECTIVES = ("scaled", "reference")
# fields a config leaves out of its JSON while they hold these defaults, so configs and checkpoints written
# before the fields existed read back equal (a resumed run compares them)
_QUIET_DEFAULTS = {"objective": "scaled", "mse_cls_coefficient": 1.0}


@dataclass(frozen=True)
class SAEConfig:
    d_model: int
    d_sae: int
    arch: str = "relu"  # one of ARCHS: "relu" (L1 penalty), "topk", "batchtopk", "jumprelu" (L0 penalty)
    k: int = 32  # active latents per token, TopK; mean active latents per token, BatchTopK
    l1_coeff: float = 8e-5  # lambda, ReLU only
    ghost_grads: bool = True  # ReLU only; the TopK family uses the AuxK loss
    aux_k: int = 0  # TopK-family auxiliary latents; 0 = d_model // 2
    aux_coeff: float = 1 / 32
    dead_steps: int = 64  # a latent is dead after this many steps without firing
    l0_coeff: float = 1e-3  # JumpReLU only: weight of the L0 penalty
    bandwidth: float = 1e-3  # JumpReLU only: width of the straight-through rectangle kernel
    init_threshold: float = 1e-3  # JumpReLU only: initial theta of every latent
    # ReLU only. "scaled": inputs scaled once so E||x||^2 = d_model, plain MSE, encoder initialised as the
    # decoder's transpose. "reference": the reference code's loss exactly: raw inputs, per-element error
    # (x_hat - x)^2 / ||x||_2, its ghost-grad normalisation, Kaiming-uniform independent W_enc / W_dec.
    objective: str = "scaled"
    mse_cls_coefficient: float = 1.0  # reference objective: weight of CLS-token rows in the MSE

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise PatchSAEError(f"unknown SAE architecture {self.arch!r} (choose {', '.join(ARCHS)})")
        if self.arch in TOPK_FAMILY and not 0 < self.k <= self.d_sae:
            raise PatchSAEError(f"{self.arch} k={self.k} must be in 1..d_sae={self.d_sae}")
        if self.arch == "jumprelu" and not (self.bandwidth > 0 and self.init_threshold > 0 and self.l0_coeff >= 0):
            raise PatchSAEError("jumprelu needs bandwidth > 0, init_threshold > 0 and l0_coeff >= 0")
        if self.objective not in OBJECTIVES:
            raise PatchSAEError(f"unknown SAE objective {self.objective!r} (choose {', '.join(OBJECTIVES)})")
        if self.objective == "reference" and self.arch != "relu":
            raise PatchSAEError(f"the reference objective is the ReLU SAE's; {self.arch} has only 'scaled'")
        if not self.mse_cls_coefficient >= 0:
            raise PatchSAEError(f"mse_cls_coefficient must be >= 0, got {self.mse_cls_coefficient}")
        if self.mse_cls_coefficient != 1.0 and self.objective != "reference":
            raise PatchSAEError("mse_cls_coefficient weights the reference objective's MSE; "
                                "use objective='reference' or leave it at 1")

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in _QUIET_DEFAULTS or v != _QUIET_DEFAULTS[k]}
