"""Stage 3, text-only RL (paper Section 4.2, "TRL"): the same GRPO loop as grpo_mm.py on text records, starting
from grpo_mm's final model, with the vision tower frozen and a small KL penalty to that starting model.

Only the defaults differ from stage 2 (PAPER.md):
  - data: text-only records; `freeze_vision = True`;
  - `kl_coef = 2e-3` (paper Table 5, k3 / "low_var_kl"; the released code's 1e-2 is `--kl_coef=1e-2`), so a
    frozen, no-grad (and, when distributed, sharded) copy of the starting model is loaded as the reference;
  - the entropy schedule of Table 5 as in stage 2.
The loop, the losses, PAD and the logs are grpo_mm.py's (imported, not copied).
Launch: `python grpo_text.py --model out/grpo_mm/final ...` or `torchrun --nproc_per_node 8 grpo_text.py
--config configs/grpo_text_7b.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass

import common as C
from grpo_mm import GRPOConfig, train


@dataclass
class GRPOTextConfig(GRPOConfig):
    """Text-only GRPO (stage 3). Defaults run the tiny model on CPU; configs/grpo_text_7b.yaml has Table 5's."""

    model: str = "out/grpo_mm/final"
    data: str = "out/synth/text_train.jsonl"
    eval_data: str = ""
    out_dir: str = "out/grpo_text"
    freeze_vision: bool = True
    kl_coef: float = 2e-3
    stage: str = "grpo_text"


if __name__ == "__main__":
    C.main_guard(train, GRPOTextConfig)
