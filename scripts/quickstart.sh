#!/usr/bin/env bash
# Quickstart on the CPU. Until the training loop lands (issue 4), this runs one forward/backward
# of the quickstart SR-DiT (every part of the recipe) through the real loss on random data.
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python - <<'PY'
import torch
from srdit.config import preset
from srdit.model import build_model, count_params
from srdit.train.loss import diffusion_loss, draw_step_noise

cfg = preset("quickstart")
model = build_model(cfg).train()
m = cfg.model
x = torch.randn(8, m.in_channels, m.input_size, m.input_size)
teacher = torch.randn(8, m.num_tokens, m.teacher_dim)
y = torch.randint(0, m.num_classes, (8,))
noise = draw_step_noise(8, x.shape[1:], m, cfg.train)
total, parts = diffusion_loss(model, x, y, teacher, noise, cfg.train)
total.backward()
print(f"quickstart SR-DiT: {count_params(model):,} parameters, {m.num_tokens} tokens ({m.num_kept} routed)")
print("loss", f"{total.item():.4f}", {k: round(v.item(), 4) for k, v in parts.items()})
PY
