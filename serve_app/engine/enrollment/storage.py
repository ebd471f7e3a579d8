"""Conditionals on disk in upstream's `conds.pt` form (`Conditionals.save` / `Conditionals.load` compatible)."""
from __future__ import annotations

from pathlib import Path

import torch


def save_conds(conds, path: str | Path) -> Path:
    """Write `conds` (upstream Conditionals) as upstream does: torch.save({"t3": T3Cond.__dict__, "gen": dict})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    t3 = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in conds.t3.__dict__.items()}
    gen = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in conds.gen.items()}
    torch.save(dict(t3=t3, gen=gen), tmp)
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def load_conds(path: str | Path, device: str | torch.device = "cpu"):
    """Read a conds.pt (ours or upstream's, e.g. the hub's) -> upstream Conditionals on device."""
    from chatterbox.tts import Conditionals

    return Conditionals.load(path, map_location="cpu").to(device)
